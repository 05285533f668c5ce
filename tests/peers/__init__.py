"""Third-party SMSsync peers for integration tests: installer (install.sh) and runners (runners.py)."""
