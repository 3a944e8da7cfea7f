#!/usr/bin/env python3
"""Drives burrow-edge's admin API with a client generated from its OpenAPI document, as a
platform would: nothing here but the generated package (openapi-python-client's `burrow_admin`,
on PYTHONPATH) and the standard library.

  BURROW_ADMIN_TOKEN=T python generated_client.py BASE_URL DEVBOX_ID

Registers DEVBOX_ID with an authenticated tunnel that wakes on HTTP, reads it back, rotates its
tunnel token, disables the tunnel, deletes the devbox and reads it again; prints one JSON object
with what each step got back. `model` is the class the client parsed the answer into (a plain
dict or None would mean it did not know the answer), `status` the HTTP status. Tokens are not
printed, only whether they are there and whether the rotated one is new.
"""

import json
import os
import sys

from burrow_admin import AuthenticatedClient
from burrow_admin.api.devboxes import create_devbox, delete_devbox, get_devbox
from burrow_admin.api.tunnels import disable_tunnel, rotate_tunnel_token
from burrow_admin.models import AuthMode, CreateDevbox, EnableTunnel


def model(parsed):
    return type(parsed).__name__


def main():
    base_url, devbox_id = sys.argv[1], sys.argv[2]
    # An answer the document does not list raises instead of parsing to None.
    client = AuthenticatedClient(
        base_url=base_url,
        token=os.environ["BURROW_ADMIN_TOKEN"],
        raise_on_unexpected_status=True,
    )
    seen = {}

    body = CreateDevbox(
        id=devbox_id,
        tunnel=EnableTunnel(auth_mode=AuthMode.AUTHENTICATED, wake_on_http=True),
    )
    answer = create_devbox.sync_detailed(client=client, body=body)
    created = answer.parsed
    seen["create"] = {
        "status": answer.status_code,
        "model": model(created),
        "tunnel_model": model(created.tunnel),
        "id": created.id,
        "agent_token": isinstance(created.agent_token, str),
        "auth_token": isinstance(created.tunnel.auth_token, str),
        "auth_mode": created.tunnel.auth_mode.value,
        "wake_on_http": created.tunnel.wake_on_http,
    }

    answer = get_devbox.sync_detailed(devbox_id, client=client)
    shown = answer.parsed
    seen["get"] = {
        "status": answer.status_code,
        "model": model(shown),
        "tunnel_model": model(shown.tunnel),
        "agent_model": model(shown.agent),
        "id": shown.id,
        "last_activity_ms": shown.last_activity_ms,
        "agent_connected": shown.agent.connected,
        "auth_mode": shown.tunnel.auth_mode.value,
        "wake_on_http": shown.tunnel.wake_on_http,
        "same_key": shown.tunnel.tunnel_key == created.tunnel.tunnel_key,
    }

    answer = rotate_tunnel_token.sync_detailed(devbox_id, client=client)
    rotated = answer.parsed
    seen["rotate"] = {
        "status": answer.status_code,
        "model": model(rotated),
        "new_token": rotated.auth_token != created.tunnel.auth_token,
        "same_key": rotated.tunnel_key == created.tunnel.tunnel_key,
    }

    answer = disable_tunnel.sync_detailed(devbox_id, client=client)
    seen["disable"] = {"status": answer.status_code}
    shown = get_devbox.sync(devbox_id, client=client)
    seen["disable"]["tunnel"] = shown.tunnel

    answer = delete_devbox.sync_detailed(devbox_id, client=client)
    seen["delete"] = {"status": answer.status_code}

    answer = get_devbox.sync_detailed(devbox_id, client=client)
    seen["get_deleted"] = {
        "status": answer.status_code,
        "model": model(answer.parsed),
        "error": answer.parsed.error,
    }

    json.dump(seen, sys.stdout)
    print()


if __name__ == "__main__":
    main()
