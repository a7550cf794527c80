"""The real Backstage backend the suite starts by itself (tests/backstage.py) really is one."""

from __future__ import annotations

import jwt
import pytest

from tests.backstage import (
    GUEST_GROUP,
    GUEST_USER,
    STATIC_SUBJECT,
    STATIC_TOKEN,
    SessionBackstage,
)

pytestmark = pytest.mark.backstage


def _authorize(backstage: SessionBackstage, token: str, name: str) -> str:
    import httpx
    response = httpx.post(
        f"{backstage.base_url}/api/permission/authorize",
        headers={"authorization": f"Bearer {token}"},
        json={"items": [{"id": "1", "permission": {"type": "basic", "name": name,
                                                   "attributes": {}}}]}, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["items"][0]["result"])


def test_guest_user_token_is_a_real_backstage_user_token(backstage: SessionBackstage) -> None:
    token = backstage.guest_token()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "vnd.backstage.user" and header["alg"] == "ES256"
    who = backstage.whoami(token)
    assert who.status_code == 200, who.text
    assert who.json()["principal"]["userEntityRef"] == GUEST_USER
    assert "ent" not in jwt.decode(token, options={"verify_signature": False})
    info = backstage.userinfo(token)
    assert info.json() == {"claims": {"sub": GUEST_USER,
                                      "ent": [GUEST_USER, GUEST_GROUP]}}


def test_plugin_and_static_tokens_are_service_principals(backstage: SessionBackstage) -> None:
    plugin = backstage.whoami(backstage.plugin_token("whoami"))
    assert plugin.json()["principal"] == {"type": "service", "subject": "plugin:devtokens"}
    static = backstage.whoami(STATIC_TOKEN)
    assert static.json()["principal"]["subject"] == STATIC_SUBJECT
    assert backstage.whoami("not-a-token").status_code == 401


def test_permission_policy_is_steered_by_the_permission_name(
        backstage: SessionBackstage) -> None:
    token = backstage.guest_token()
    assert _authorize(backstage, token, "test.allow.read") == "ALLOW"
    assert _authorize(backstage, token, "test.deny.read") == "DENY"
    assert _authorize(backstage, token, f"test.user.{GUEST_USER}") == "ALLOW"
    assert _authorize(backstage, token, "test.user.user:default/someone-else") == "DENY"
    assert any("permission-policy:" in line for line in backstage.log_lines())


def test_discovery_points_insights_at_the_reserved_sidecar_port(
        backstage: SessionBackstage) -> None:
    assert backstage.discovered == {
        "insights": f"http://127.0.0.1:{backstage.sidecar_port}/api/insights"}
