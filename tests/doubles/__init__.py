"""Test doubles of the platforms issue 15 connects the gateway to: RapidPro's courier (External channel), Kannel
clients with their dlr-url, and a webhook receiver that verifies signatures as docs/integrations.md says."""
