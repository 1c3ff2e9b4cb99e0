"""Admin pages: dead letters (with replay), users and roles, the audit log.

HTTP tests through the ASGI app on both databases, plus two browser tests against
the live server. A page the visitor lacks the permission for answers 403 with the
"you don't have permission" page; another factory's user is the 404 page.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

import httpx
from sqlalchemy import text, update

from plantwatch.app import Container
from plantwatch.telemetry.models import DeadLetter
from plantwatch.tenancy.models import AuditEntry, Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem
from tests.telemetry.conftest import keyed_device, now_ms
from tests.web.conftest import AsBrowser, BrowserPage, Live

ADMIN_NAV = ('href="/dead-letters"', 'href="/users"', 'href="/audit"')


async def _dead_letter(
    container: Container,
    factory: Factory,
    payload: bytes,
    reason: str = "unknown_device",
    device_key: str | None = "P7",
    topic: str | None = None,
) -> None:
    await container.pipeline.dead_letter(
        factory_id=factory.id,
        source="mqtt",
        raw=payload,
        reason=reason,
        detail=f"{reason} for test",
        topic=topic,
        device_key=device_key,
    )


async def _set_timezone(browser: httpx.AsyncClient, tz: str) -> None:
    response = await browser.patch("/api/v1/factory", json={"timezone": tz})
    assert response.status_code == 200, response.text


async def _exec(container: Container, stmt: Any) -> None:
    async with container.db.engine.begin() as conn:
        await conn.execute(stmt)


NOON_UTC = dt.datetime(2026, 1, 15, 12, tzinfo=dt.UTC)  # 21:00 in Asia/Tokyo


def _table(response: httpx.Response, element_id: str) -> str:
    """The page from the table's element on: leaves out the top bar and the filters."""
    assert response.status_code == 200, response.text
    return response.text.split(f'id="{element_id}"', 1)[1]


def _ids_in_table(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-id="(\d+)"', html)]


# --- dead letters -------------------------------------------------------------------------


async def test_dead_letters_page_shows_own_factory_payloads_safely_with_filters(
    as_browser: AsBrowser,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    factory_a: Factory,
    factory_b: Factory,
) -> None:
    good = json.dumps({"ts": now_ms(), "values": {"flow": 12.5}}).encode()
    await _dead_letter(container, factory_a, good, topic="factories/acme/devices/P7/telemetry")
    await _dead_letter(
        container,
        factory_a,
        b"\xff\xfe<script>alert(1)</script>\x01",
        reason="invalid_json",
        device_key="M01",
    )
    await _dead_letter(container, factory_b, b"{}", device_key="GLOBEX-ONLY")
    browser = await as_browser(admin_a)
    await _set_timezone(browser, "Asia/Tokyo")
    await _exec(container, update(DeadLetter).values(received_at=NOON_UTC))

    page = await browser.get("/dead-letters")
    assert page.status_code == 200, page.text
    html = page.text
    assert "Dead letters" in html and "Replay selected" in html
    assert "GLOBEX-ONLY" not in html
    assert len(_ids_in_table(html)) == 2
    assert "factories/acme/devices/P7/telemetry" in html
    # JSON pretty-printed in the expandable details, escaped for HTML.
    assert "&#34;flow&#34;: 12.5" in html
    # Bytes that are not UTF-8 and control characters are shown as escapes, markup escaped.
    assert "<script>alert(1)" not in html
    assert "\\xff\\xfe&lt;script&gt;alert(1)&lt;/script&gt;\\x01" in html
    # Received times in the factory's timezone (12:00 UTC is 21:00 in Tokyo).
    assert "2026-01-15 21:00:00" in html
    assert 'id="dl-select-all"' in html and html.count('class="dl-select"') == 2
    # Open counts per reason link to the filtered list.
    assert 'href="/dead-letters?reason=unknown_device"' in html

    only_json = await browser.get("/dead-letters", params={"reason": "invalid_json"})
    assert "M01" in only_json.text and len(_ids_in_table(only_json.text)) == 1
    by_device = await browser.get("/dead-letters", params={"device": "P7"})
    assert len(_ids_in_table(by_device.text)) == 1
    # The time range is read in the factory's timezone.
    inside = await browser.get(
        "/dead-letters", params={"start": "2026-01-15T20:30", "end": "2026-01-15T21:30"}
    )
    assert len(_ids_in_table(inside.text)) == 2
    after = await browser.get("/dead-letters", params={"start": "2026-01-15T21:30"})
    assert _ids_in_table(after.text) == [] and "No dead letters match" in after.text
    bad = await browser.get("/dead-letters", params={"start": "yesterday-ish", "page": "x"})
    assert bad.status_code == 200
    assert "Not a date and time" in bad.text and len(_ids_in_table(bad.text)) == 2

    other = await (await as_browser(admin_b)).get("/dead-letters")
    assert "GLOBEX-ONLY" in other.text and len(_ids_in_table(other.text)) == 1


async def test_replay_from_the_page_after_registering_the_device(
    as_browser: AsBrowser,
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    factory_a: Factory,
) -> None:
    """The page's flow: select the letter, replay (the API, with the session cookie and
    CSRF header the page's script sends), read the outcome, refresh the table."""
    payload = json.dumps({"ts": now_ms(), "values": {"flow": 12.5}}).encode()
    await _dead_letter(container, factory_a, payload)
    browser = await as_browser(admin_a)
    page = await browser.get("/dead-letters")
    [letter_id] = _ids_in_table(page.text)
    assert f'value="{letter_id}" aria-label="Select dead letter #{letter_id}"' in page.text

    first = await browser.post("/api/v1/dead-letters/replay", json={"ids": [letter_id]})
    assert first.status_code == 200, first.text
    [outcome] = first.json()["data"]
    assert outcome["status"] == "unresolved" and "not registered" in outcome["detail"]
    still = await browser.get("/dead-letters/rows")
    assert _ids_in_table(still.text) == [letter_id] and "not replayed" in still.text

    await keyed_device(client, admin_a, "P7")
    second = await browser.post("/api/v1/dead-letters/replay", json={"ids": [letter_id]})
    assert second.json()["data"][0]["status"] == "stored", second.text

    # The refreshed table (open letters by default) no longer lists it; "all" shows it replayed.
    refreshed = await browser.get("/dead-letters/rows")
    assert refreshed.status_code == 200
    assert _ids_in_table(refreshed.text) == []
    assert "<html" not in refreshed.text  # a fragment, not a page
    everything = await browser.get("/dead-letters/rows", params={"status": "all"})
    assert _ids_in_table(everything.text) == [letter_id]
    assert "replayed" in everything.text and "stored 1 values" in everything.text
    assert 'class="dl-select"' not in everything.text  # nothing left to replay
    async with container.db.engine.connect() as conn:
        values = [r[0] for r in await conn.execute(text("SELECT value FROM telemetry_raw"))]
    assert values == [12.5]


# --- permissions ------------------------------------------------------------------------


async def test_viewer_has_no_admin_nav_and_gets_the_forbidden_page(
    as_browser: AsBrowser, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    viewer = await login_as(factory_a, "viewer")
    browser = await as_browser(viewer)
    for url in ("/dead-letters", "/dead-letters/rows", "/users", "/users/rows", "/audit"):
        response = await browser.get(url)
        assert response.status_code == 403, url
        assert "You don't have permission" in response.text, url
        for link in ADMIN_NAV:
            assert link not in response.text, (url, link)
    own = await browser.get(f"/users/{admin_a.user_id}")
    assert own.status_code == 403 and "users:read" in own.text
    # The API refuses the actions too.
    assert_problem(
        await browser.post(
            "/api/v1/users/invite", json={"email": "x@acme.example", "role": "viewer"}
        ),
        403,
    )
    assert_problem(await browser.post("/api/v1/dead-letters/replay", json={"ids": [1]}), 403)
    assert_problem(await browser.get("/api/v1/audit"), 403)


async def test_factory_manager_reads_users_and_audit_without_controls(
    as_browser: AsBrowser, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    manager = await login_as(factory_a, "factory_manager")
    browser = await as_browser(manager)
    users = await browser.get("/users")
    assert users.status_code == 200
    assert admin_a.email in users.text and manager.email in users.text
    assert 'id="invite-form"' not in users.text and "Send invite" not in users.text
    assert "needs the <code>users:manage</code> permission" in users.text
    assert 'href="/users"' in users.text and 'href="/audit"' in users.text
    assert 'href="/dead-letters"' not in users.text  # no telemetry:write
    # The roles reference is there for everyone who sees the page.
    assert "Runs the plant: settings, approvals, alert policy, reports, audit" in users.text
    detail = await browser.get(f"/users/{admin_a.user_id}")
    assert detail.status_code == 200
    assert 'id="access-form"' not in detail.text
    assert "Deactivate user" not in detail.text
    assert "Recent changes to this user" in detail.text  # audit:read
    assert (await browser.get("/audit")).status_code == 200
    assert (await browser.get("/dead-letters")).status_code == 403
    assert_problem(
        await browser.patch(f"/api/v1/users/{admin_a.user_id}", json={"role": "viewer"}), 403
    )


async def test_user_manager_sees_only_roles_they_may_assign(
    as_browser: AsBrowser, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    """A factory manager granted users:manage may invite, but never a super admin nor a
    role with permissions they lack (maintenance engineer: devices:keys ...)."""
    manager = await login_as(factory_a, "factory_manager", grants=["users:manage"])
    viewer = await login_as(factory_a, "viewer")
    browser = await as_browser(manager)
    users = await browser.get("/users")
    assert 'id="invite-form"' in users.text
    form = users.text.split('id="invite-form"')[1].split("</form>")[0]
    options = re.findall(r'<option value="([a-z_]+)"', form)
    # Technicians hold workorders:write, which a factory manager lacks.
    assert options == ["factory_manager", "quality_inspector", "viewer"]
    refused = await browser.post(
        "/api/v1/users/invite", json={"email": "t@acme.example", "role": "technician"}
    )
    assert_problem(refused, 403, "permission_escalation")
    # A super admin's page: no controls, and why.
    admin_page = await browser.get(f"/users/{admin_a.user_id}")
    assert "Only a super admin may change a super admin" in admin_page.text
    assert 'id="access-form"' not in admin_page.text
    # A viewer's page: controls, grants they do not hold are disabled.
    viewer_page = await browser.get(f"/users/{viewer.user_id}")
    assert 'id="access-form"' in viewer_page.text
    keys_box = re.search(
        r'<input type="checkbox" name="grant" value="devices:keys"[^>]*>', viewer_page.text
    )
    assert keys_box is not None and "disabled" in keys_box.group(0)
    audit_box = re.search(
        r'<input type="checkbox" name="grant" value="audit:read"[^>]*>', viewer_page.text
    )
    assert audit_box is not None and "disabled" not in audit_box.group(0)


# --- users ------------------------------------------------------------------------------


async def test_users_list_invite_role_change_and_deactivation(
    as_browser: AsBrowser,
    login_as: LoginAs,
    factory_a: Factory,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    browser = await as_browser(admin_a)
    page = await browser.get("/users")
    assert page.status_code == 200
    assert admin_a.email in page.text and admin_b.email not in page.text
    invite_form = page.text.split('id="invite-form"')[1].split("</form>")[0]
    assert '<option value="super_admin"' in invite_form  # a super admin may make one

    invited = await browser.post(
        "/api/v1/users/invite",
        json={"email": "new.hire@acme.example", "full_name": "New Hire", "role": "technician"},
    )
    assert invited.status_code == 201, invited.text
    new_id = invited.json()["data"]["user"]["id"]
    assert invited.json()["data"]["accept_url"].endswith(invited.json()["data"]["invite_token"])

    rows = await browser.get("/users/rows", params={"status": "pending"})
    assert "new.hire@acme.example" in rows.text and "invite pending" in rows.text
    assert admin_a.email not in rows.text
    assert "<html" not in rows.text
    search = _table(await browser.get("/users", params={"search": "hire"}), "users-table")
    assert "new.hire@acme.example" in search and admin_a.email not in search
    by_role = _table(await browser.get("/users", params={"role": "super_admin"}), "users-table")
    assert admin_a.email in by_role and "new.hire@acme.example" not in by_role
    # Email ascending by default ("new.hire" < "super_admin..."); a header link flips it.
    ascending = _table(await browser.get("/users"), "users-table")
    assert ascending.index("new.hire@acme.example") < ascending.index(admin_a.email)
    assert '<a href="/users?sort=-email">' in ascending
    descending = _table(await browser.get("/users", params={"sort": "-email"}), "users-table")
    assert 'aria-sort="descending"' in descending
    assert descending.index(admin_a.email) < descending.index("new.hire@acme.example")
    bad = await browser.get("/users", params={"status": "bogus", "sort": "password_hash"})
    assert bad.status_code == 200 and "new.hire@acme.example" in bad.text

    detail = await browser.get(f"/users/{new_id}")
    assert detail.status_code == 200
    assert "New Hire" in detail.text and "invite pending" in detail.text
    assert 'id="access-form"' in detail.text and "New invite link" in detail.text
    assert 'id="role-permissions"' in detail.text and "Deactivate user" in detail.text

    changed = await browser.patch(
        f"/api/v1/users/{new_id}",
        json={"role": "maintenance_engineer", "permissions": ["audit:read"]},
    )
    assert changed.status_code == 200, changed.text
    fragment = await browser.get(f"/users/{new_id}/detail")
    assert "<html" not in fragment.text
    assert "maintenance engineer" in fragment.text
    assert re.search(r'value="audit:read" data-granted="true"', fragment.text)

    assert (await browser.delete(f"/api/v1/users/{new_id}")).status_code == 204
    fragment = await browser.get(f"/users/{new_id}/detail")
    assert "deactivated" in fragment.text and "Reactivate user" in fragment.text
    assert "Deactivate user" not in fragment.text
    listed = await browser.get("/users", params={"status": "deactivated"})
    assert "new.hire@acme.example" in _table(listed, "users-table")


async def test_other_factory_and_unknown_users_are_the_not_found_page(
    as_browser: AsBrowser, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    browser = await as_browser(admin_a)
    for ref in (str(admin_b.user_id), "999999", "abc", "99999999999999999999999"):
        for suffix in ("", "/detail"):
            response = await browser.get(f"/users/{ref}{suffix}")
            assert response.status_code == 404, ref
            assert "does not exist" in response.text and admin_b.email not in response.text


# --- audit ------------------------------------------------------------------------------


async def test_audit_page_filters_in_factory_time_and_keeps_to_the_factory(
    as_browser: AsBrowser,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    browser = await as_browser(admin_a)
    other = await as_browser(admin_b)
    invited = await browser.post(
        "/api/v1/users/invite", json={"email": "audited@acme.example", "role": "viewer"}
    )
    user_id = invited.json()["data"]["user"]["id"]
    await browser.patch(f"/api/v1/users/{user_id}", json={"role": "technician"})
    await other.post(
        "/api/v1/users/invite", json={"email": "globex.person@globex.example", "role": "viewer"}
    )
    await _set_timezone(browser, "Asia/Tokyo")
    await _exec(
        container,
        update(AuditEntry)
        .where(AuditEntry.action == "user.update", AuditEntry.entity_id == str(user_id))
        .values(at=NOON_UTC),
    )

    page = await browser.get("/audit")
    assert page.status_code == 200
    html = page.text
    assert "user.invite" in html and "user.update" in html and admin_a.email in html
    assert "globex.person@globex.example" not in html and admin_b.email not in html
    assert "2026-01-15 21:00:00" in html  # 12:00 UTC in Tokyo
    # The details hold the changed fields, before and after.
    assert (
        '<code>role</code></td><td class="mono break">viewer</td><td class="mono break">technician'
        in html
    )
    assert f'<a href="/users/{user_id}">#{user_id}</a>' in html

    updates = await browser.get("/audit", params={"action": "user.update"})
    assert "user.invite<" not in _table(updates, "audit-table") and "technician" in _table(
        updates, "audit-table"
    )
    by_object = await browser.get(
        "/audit", params={"entity_type": "user", "entity_id": str(user_id)}
    )
    assert "user.invite" in _table(by_object, "audit-table") and "auth.login" not in _table(
        by_object, "audit-table"
    )
    ranged = await browser.get(
        "/audit", params={"start": "2026-01-15T20:00", "end": "2026-01-15T22:00"}
    )
    assert "user.update" in _table(ranged, "audit-table") and "user.invite" not in _table(
        ranged, "audit-table"
    )
    by_actor = await browser.get("/audit", params={"actor": "SYSTEM"})
    assert "factory.create" in _table(by_actor, "audit-table") and "user.update" not in _table(
        by_actor, "audit-table"
    )
    mine = await browser.get("/audit", params={"user_id": str(admin_a.user_id)})
    assert "user.update" in _table(mine, "audit-table")
    backwards = await browser.get(
        "/audit", params={"start": "2026-01-15T22:00", "end": "2026-01-15T20:00"}
    )
    assert backwards.status_code == 200 and "Must be after the start" in backwards.text


# --- browser ----------------------------------------------------------------------------


def test_viewer_sees_no_admin_entries_and_no_admin_controls(browser_page: BrowserPage) -> None:
    from playwright.sync_api import expect

    page: Any = browser_page("viewer")
    response = page.goto("/users")
    assert response.status == 403
    expect(page.get_by_role("heading", name="You don't have permission")).to_be_visible()
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Alerts")).to_be_visible()
    for name in ("Users", "Dead letters", "Audit log"):
        expect(nav.get_by_role("link", name=name)).to_have_count(0)
    expect(page.get_by_role("button", name="Send invite")).to_have_count(0)
    expect(page.locator("#invite-form, #access-form")).to_have_count(0)


def test_admin_invites_a_user_changes_the_role_and_finds_it_in_the_audit_log(
    browser_page: BrowserPage, live: Live
) -> None:
    from playwright.sync_api import expect

    email = f"admin-ui-{uuid.uuid4().hex[:8]}@acme.example"
    page: Any = browser_page("admin")
    page.goto("/audit")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Users").click()
    expect(page.get_by_role("heading", name="Users and roles")).to_be_visible()

    invite = page.locator("#invite-form")
    invite.get_by_label("Email").fill(email)
    invite.get_by_label("Name").fill("Ada Admin-UI")
    invite.get_by_label("Role").select_option("viewer")
    invite.get_by_role("button", name="Send invite").click()
    link = page.get_by_label("Invite link")
    expect(link).to_have_value(re.compile(r"/accept-invite\?token=pwi_"))
    # The table was refreshed in place: the new user is listed as pending.
    row = page.locator("#users-table tr", has_text=email)
    expect(row).to_contain_text("invite pending")

    row.get_by_role("link", name=email).click()
    expect(page.get_by_role("heading", name="Ada Admin-UI")).to_be_visible()
    user_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.get_by_role("combobox", name=re.compile(r"^Role")).select_option("technician")
    page.get_by_role("button", name="Save role and permissions").click()
    expect(page.locator("#user-role")).to_contain_text("technician")
    expect(page.locator("#access-saved")).to_have_text("Saved")

    page.get_by_role("button", name="Deactivate user").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(email)
    dialog.get_by_role("button", name="Deactivate").click()
    expect(page.locator("#user-status")).to_contain_text("deactivated")
    expect(page.get_by_role("button", name="Reactivate user")).to_be_visible()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit log").click()
    page.get_by_label("Object type").fill("user")
    page.get_by_label("Object id").fill(user_id)
    page.get_by_label("Action").fill("user.update")
    page.get_by_role("button", name="Apply filters").click()
    entry = page.locator("#audit-table table.audit > tbody > tr", has_text="user.update")
    expect(entry).to_have_count(1)
    expect(entry).to_contain_text(live.users["admin"].email)
    entry.locator("summary").click()
    expect(entry.locator("table.changes")).to_contain_text("technician")
    page.get_by_label("Action").fill("user.deactivate")
    page.get_by_role("button", name="Apply filters").click()
    expect(
        page.locator("#audit-table table.audit > tbody > tr", has_text="user.deactivate")
    ).to_have_count(1)
