"""The dashboard and its JSON API, served by the daemon itself (Starlette on uvicorn, in one thread).

server.py runs it; app.py wires the routes; view.py is its one door into the daemon (the snapshot, the
journal's counters, the failed files, the actions); pages.py and api.py answer; users.py and sessions.py
hold the accounts, the logins and the CSRF tokens; samples.py keeps the charts' last day.
"""
