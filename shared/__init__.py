"""Segment exports (Customer Insights CDM folders, CSV, JSON Lines) to SendGrid Marketing contact lists."""

__version__ = "0.1.0"
USER_AGENT = f"sendgrid-segment-connector/{__version__}"
