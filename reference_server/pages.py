"""The reference server's HTML pages: the operator page (``GET /``) and the outbox form (``GET /outbox``)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

RESULTS_OFF = "sent — results off"


def display_status(record: Mapping[str, Any], counters: Mapping[str, int]) -> str:
    """The status the page shows for an outgoing SMS: its own, except ``RESULTS_OFF`` for one handed out in
    several ``task=send`` polls while the gateway never sent ``task=sent`` (an endpoint without the Message
    Results API never acknowledges, so "pending" would stay for ever; its modem sent it at the first poll)."""
    status = str(record["status"])
    if status == "pending" and record.get("offered", 0) >= 2 and not counters.get("task_sent_posts"):
        return RESULTS_OFF
    return status


def render_html(snapshot: Mapping[str, Any], sync_path: str) -> str:
    """The operator page: received SMS, outgoing SMS and their delivery state; refreshes every 2 s.

    Every value is HTML-escaped; the snapshot never contains the secret.
    """

    def esc(value: Any) -> str:
        return html.escape("" if value is None else str(value))

    received_rows = (
        "".join(
            f"<tr><td>{esc(m['received_at'])}</td><td>{esc(m['from'])}</td><td>{esc(m['message'])}</td>"
            f"<td>{esc(m['sent_to'])}</td><td>{esc(m['device_id'])}</td><td>{esc(m['message_id'])}</td>"
            f"<td>{esc(m['repeats'])}</td></tr>"
            for m in reversed(snapshot["received"])
        )
        or '<tr><td colspan="7">none yet</td></tr>'
    )
    outgoing_rows = (
        "".join(
            f'<tr class="{esc(o["status"])}"><td>{esc(o["created_at"])}</td><td>{esc(o["to"])}</td>'
            f"<td>{esc(o['message'])}</td><td>{esc(o['source'])}</td>"
            f"<td><b>{esc(display_status(o, snapshot['counters']))}</b></td>"
            f"<td>{esc(o['sent_result_code'])} {esc(o['sent_result_message'])}</td>"
            f"<td>{esc(o['delivered_result_code'])} {esc(o['delivered_result_message'])}</td>"
            f"<td>{esc(o['uuid'])}</td></tr>"
            for o in reversed(snapshot["outgoing"])
        )
        or '<tr><td colspan="8">none yet</td></tr>'
    )
    counters = ", ".join(f"{esc(k)}={esc(v)}" for k, v in snapshot["counters"].items())
    config = snapshot["config"]
    outage = f" — <b>simulating HTTP {esc(config['fail_status'])}</b>" if config.get("fail_status") is not None else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>SMSsync reference server</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }}
th {{ background: #eee; }} .delivered {{ background: #e6ffe6; }} .failed {{ background: #ffe6e6; }}
.sent {{ background: #f3fff3; }} .queued {{ background: #fffbe6; }}
</style></head><body>
<h1>SMSsync reference server</h1>
<p>Sync path <code>{esc(sync_path)}</code>; instant reply {"on" if config["reply"] else "off"}{outage}.
Page refreshes every 2 s. <a href="/outbox">Queue an outgoing SMS</a></p>
<h2>Received SMS ({len(snapshot["received"])})</h2>
<table><tr><th>received at (UTC)</th><th>from</th><th>message</th><th>sent to</th><th>device</th>
<th>message id</th><th>repeats</th></tr>{received_rows}</table>
<h2>Outgoing SMS ({len(snapshot["outgoing"])})</h2>
<table><tr><th>created at (UTC)</th><th>to</th><th>message</th><th>source</th><th>status</th>
<th>sent result</th><th>delivery result</th><th>uuid</th></tr>{outgoing_rows}</table>
<p><small>{counters}</small></p>
</body></html>
"""


def render_outbox_form(sync_path: str, base_url: str) -> str:
    """The page of ``GET /outbox``: a form queueing one outgoing SMS (``POST /outbox``), and the curl line that
    does the same. Its own page because the main page reloads every 2 s and would wipe what is being typed."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Queue an outgoing SMS</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} label {{ display: block; margin: .5em 0; }}</style>
</head><body>
<h1>Queue an outgoing SMS</h1>
<p>The SMS waits here until the gateway's next <code>{html.escape(sync_path)}?task=send</code> poll, then a modem
sends it; follow it on <a href="/">the main page</a>.</p>
<form method="post" action="/outbox">
<label>to <input name="to" required placeholder="+255700000001" pattern="\\+?[0-9 ]{{3,24}}"></label>
<label>text <textarea name="text" required rows="4" cols="60"></textarea></label>
<button type="submit">Queue</button>
</form>
<p>Or: <code>curl -s --data-urlencode to=+255700000001 --data-urlencode 'text=Habari'
{html.escape(base_url)}/outbox</code></p>
</body></html>
"""
