"""Lists' contact counts as deltas (migration 0010) and the worker's folding of them."""
import asyncio

import asyncpg

from services.worker.folding import fold_contact_counts
from tests.helpers import add_list, fold_while_writing, make_tenant, random_phone


async def _counts(db, list_id: int) -> tuple[int, int, int]:
    """(contacts stored, the count the deltas give, delta rows) of a list."""
    return tuple(await db.fetchrow(
        "SELECT (SELECT count(*) FROM contacts WHERE list_id = $1),"
        " (SELECT coalesce(sum(contacts), 0) FROM list_contact_counts WHERE list_id = $1),"
        " (SELECT count(*) FROM list_contact_counts WHERE list_id = $1)", list_id))


async def _add(conn, account_id: int, list_id: int, phones: list[str]) -> None:
    await conn.execute(
        "INSERT INTO contacts (account_id, list_id, phone_number) SELECT $1, $2, p FROM unnest($3::text[]) AS t(p)"
        " ON CONFLICT DO NOTHING", account_id, list_id, phones)


async def test_only_contacts_a_statement_adds_or_removes_are_counted(db):
    tenant = await make_tenant(db)
    other = await add_list(db, tenant, name="other")
    phones = [random_phone() for _ in range(3)]
    await _add(db, tenant.account_id, tenant.list_id, phones)
    await _add(db, tenant.account_id, tenant.list_id, phones[1:] + [random_phone()])  # two known, one new
    # As the click drainer and history/clicks write: an existing contact is updated, not added.
    await db.execute(
        "INSERT INTO contacts (account_id, list_id, phone_number, click_count) SELECT $1, l, p, 1"
        " FROM unnest($2::bigint[], $3::text[]) AS t(l, p)"
        " ON CONFLICT (list_id, phone_number) DO UPDATE SET click_count = contacts.click_count + 1",
        tenant.account_id, [tenant.list_id, other["list_id"]], [phones[0], phones[0]])
    assert await _counts(db, tenant.list_id) == (4, 4, 2)  # the update wrote no delta
    assert (await _counts(db, other["list_id"]))[:2] == (1, 1)
    await db.execute("DELETE FROM contacts WHERE list_id = $1 AND phone_number = ANY($2::text[])", tenant.list_id, phones[:2])
    assert (await _counts(db, tenant.list_id))[:2] == (2, 2)


async def test_concurrent_inserts_of_the_same_contacts_count_each_once(db, settings):
    tenant = await make_tenant(db)
    phones = [random_phone() for _ in range(5)]
    first, second = await asyncpg.connect(settings.database_url), await asyncpg.connect(settings.database_url)
    try:
        tx = first.transaction()
        await tx.start()
        await _add(first, tenant.account_id, tenant.list_id, phones[:3])
        # Waits on the first transaction's uncommitted contacts, then skips them.
        waiting = asyncio.create_task(_add(second, tenant.account_id, tenant.list_id, phones[1:]))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await tx.commit()
        await waiting
    finally:
        await first.close()
        await second.close()
    assert (await _counts(db, tenant.list_id))[:2] == (5, 5)


async def test_folding_keeps_every_count_and_what_is_written_meanwhile(db, settings):
    tenant = await make_tenant(db)
    for _ in range(4):
        await _add(db, tenant.account_id, tenant.list_id, [random_phone(), random_phone()])
    assert await _counts(db, tenant.list_id) == (8, 8, 4)
    # A send not yet committed while one worker folds, and another worker folding at once.
    await fold_while_writing(settings.database_url, db,
                             lambda conn: _add(conn, tenant.account_id, tenant.list_id, [random_phone()]),
                             fold_contact_counts)
    assert await _counts(db, tenant.list_id) == (9, 9, 2)  # the fold's row and the late send's
    await fold_contact_counts(db)
    assert await _counts(db, tenant.list_id) == (9, 9, 1)


async def test_a_truncate_forgets_the_counts(settings):
    """TRUNCATE contacts resets every count (in a transaction rolled back: the tables are shared)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO list_contact_counts (list_id, contacts) VALUES (-1, 3)")
        await conn.execute("TRUNCATE contacts CASCADE")
        assert await conn.fetchval("SELECT count(*) FROM list_contact_counts") == 0
        await tx.rollback()
    finally:
        await conn.close()
