"""The send API (issue 15): messages enter the gateway over HTTP — RapidPro's External channel, Kannel's
``/cgi-bin/sendsms`` and a REST API — and leave through the same routes, SIM limits and never-twice ledger as
``?task=send`` messages.

* ``settings``  the API's variables and each endpoint's credentials.
* ``limits``    the per-key token bucket and the outbound queue depths (backpressure).
* ``accept``    one request's messages: id, store, confirmed publish (the one path every API takes).
* ``rapidpro``, ``kannel``, ``rest``  each API's request and answer.
* ``app``       the Starlette application: routing, body limit, auth failures, metrics, one log line per rejection.
* ``server``    uvicorn on a thread of its own: bind first, drain on the first SIGTERM.
"""
