"""The python-backend models of the served path; each generated model.py imports its class from here."""
