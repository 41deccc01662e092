FROM python:3.11-slim
RUN useradd --system --home /var/lib/attachgate --create-home attachgate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY web ./web
COPY storage ./storage
RUN pip install --no-cache-dir . && rm -rf /src
USER attachgate
WORKDIR /var/lib/attachgate
EXPOSE 587 465 8080
ENTRYPOINT ["attachgate"]
CMD ["serve", "--config", "/etc/attachgate/attachgate.toml"]
