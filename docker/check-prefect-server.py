"""check-prefect-server.py URL: exit 0 when the Prefect API at URL answers and takes our credentials.

`make worker` and `make deploy` run it first, so that a missing server or a wrong auth string is one
line with the fix instead of a Prefect traceback. The credentials are PREFECT_API_AUTH_STRING
(user:password, sent as HTTP basic auth, as Prefect's client does) when it is set.
"""

import base64
import os
import sys
import urllib.error
import urllib.request

url = sys.argv[1].rstrip("/")
try:
    urllib.request.urlopen(f"{url}/health", timeout=10).close()
except (urllib.error.URLError, OSError):
    sys.exit(f"error: no Prefect server answers at {url}: start one with 'make server' in another terminal, "
             "or set PREFECT_API_URL")
request = urllib.request.Request(f"{url}/admin/version")
auth = os.environ.get("PREFECT_API_AUTH_STRING")
if auth:
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    urllib.request.urlopen(request, timeout=10).close()
except urllib.error.HTTPError as exc:
    if exc.code != 401:
        raise
    sys.exit(f"error: the Prefect server at {url} refused the "
             + ("auth string in PREFECT_API_AUTH_STRING" if auth else "request without an auth string")
             + ": set PREFECT_API_AUTH_STRING to its PREFECT_SERVER_API_AUTH_STRING (user:password; "
             "'make server' reads it from secrets/prefect_auth_string)")
