"""pubsub-cmdb: a VM inventory kept in sync from Pub/Sub events.

One module per job: config (settings from the environment), events (the wire format),
store (the sqlite CMDB), broker / google_broker (Pub/Sub), web (the Flask app),
worker (what subscriber.py runs for each message).
"""
