"""Default notice templates (package data): notice.txt and notice.html."""
