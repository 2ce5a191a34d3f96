"""The ``trackly`` command: run a service, migrate, or administer accounts and lists."""
from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from shared import settings as settings_mod
from shared.runtime import exit_on_sigterm, one_line, with_backends


def _print(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.migrate import migrate

    settings, embedded = with_backends(settings_mod.load(), redis=False)
    try:
        applied = asyncio.run(migrate(settings.database_url))
    except Exception as exc:  # an unreachable database too: the contract's one-line error
        return _fail(one_line(exc))
    finally:
        if embedded:
            embedded.stop()
    _print({"applied": applied})
    return 0


def _admin(args: argparse.Namespace) -> int:
    from shared import accounts, db
    from shared.migrate import migrate, pending
    from shared.phone import PhoneError

    settings, embedded = with_backends(settings_mod.load(), redis=False)

    async def go() -> dict:
        # An operator's first command against a new database may be this one: it creates the
        # schema. A database that has one is only read (its role may lack DDL rights, and
        # upgrading it is `trackly migrate`'s job, a release step); the embedded one is ours.
        waiting = None if embedded else await pending(settings.database_url)
        if embedded or waiting is None:
            await migrate(settings.database_url)
        elif waiting:
            raise ValueError(f"the database schema is behind ({', '.join(waiting)} not applied): run `trackly migrate` first")
        conn = await db.connect(settings.database_url)
        try:
            if args.admin == "create-account":
                return await accounts.create_account(conn, args.name, offer_management=not args.no_offer_management)
            if args.admin == "rotate-api-key":
                return await accounts.rotate_api_key(conn, args.account_id)
            if args.admin == "rotate-postback-token":
                return await accounts.rotate_postback_token(conn, args.account_id, grace_hours=args.grace_hours)
            if args.admin == "forget-postback-tokens":
                return await accounts.forget_postback_tokens(conn)
            return await accounts.create_list(
                conn,
                account_id=args.account_id,
                name=args.name,
                phone=args.phone,
                short_domain=args.short_domain,
                tracker_domain=args.tracker_domain,
                active=not args.inactive,
            )
        finally:
            await conn.close()

    try:
        _print(asyncio.run(go()))
    except (ValueError, PhoneError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # anything else still ends as the contract's one-line error
        return _fail(one_line(exc))
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_republish(args: argparse.Namespace) -> int:
    from shared import db
    from shared.redis_client import create_redis
    from shared.republish import republish

    settings, embedded = with_backends(settings_mod.load())

    async def go() -> dict[str, int]:
        conn = await db.connect(settings.database_url)
        redis = create_redis(settings.redis_url)
        try:
            counts = await republish(conn, redis, code_days=settings.message_code_days)
            # What the codes were written with: 0 makes every code permanent again.
            return {**counts, "message_code_days": settings.message_code_days}
        finally:
            await redis.aclose()
            await conn.close()

    try:
        _print(asyncio.run(go()))
    except Exception as exc:  # the contract's one-line error
        return _fail(one_line(exc))
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.gateway.main import serve

    return serve(settings_mod.load())


def cmd_redirect(args: argparse.Namespace) -> int:
    from services.redirect.main import serve

    return serve(settings_mod.load())


def cmd_worker(args: argparse.Namespace) -> int:
    from services.worker.main import serve

    return serve(settings_mod.load())


def cmd_run(args: argparse.Namespace) -> int:
    from services.supervisor import run_all

    return run_all(settings_mod.load())


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other error of the CLI (CONTRACT.md §2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.splitlines())  # it may quote an argument as given, line breaks and all
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="trackly", description="SMS link tracking and revenue attribution")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gateway", help="public JSON API and postback receiver").set_defaults(func=cmd_gateway)
    sub.add_parser("redirect", help="short links and click tracker").set_defaults(func=cmd_redirect)
    sub.add_parser("worker", help="arq worker: clicks, postbacks, attribution").set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="bring the schema up to date").set_defaults(func=cmd_migrate)
    sub.add_parser("run", help="everything, for a laptop").set_defaults(func=cmd_run)

    admin = sub.add_parser("admin", help="operator commands").add_subparsers(dest="admin", required=True)
    account = admin.add_parser(
        "create-account", help="a new account: prints its id, API key and postback token (the key only this once)"
    )
    account.add_argument("--name", required=True)
    account.add_argument("--no-offer-management", action="store_true", help="without the Offer Management product (POST /links answers 403)")
    account.set_defaults(func=_admin)
    lst = admin.add_parser("create-list", help="a sending list (phone number) of an account, with its link domains")
    lst.add_argument("--account-id", type=int, required=True)
    lst.add_argument("--name", required=True)
    lst.add_argument("--phone", required=True, help="the list's number, E.164 (+18005551234)")
    lst.add_argument("--short-domain", help="origin of its short links, e.g. https://sms.example.com")
    lst.add_argument("--tracker-domain", help="origin of its click tracker (default: TRACKLY_DEFAULT_TRACKER_DOMAIN)")
    lst.add_argument("--inactive", action="store_true", help="created inactive: sends and links refuse it")
    lst.set_defaults(func=_admin)
    rotate = admin.add_parser(
        "rotate-api-key", help="a new API key for an account (printed this once); the old one stops working at once"
    )
    rotate.add_argument("--account-id", type=int, required=True)
    rotate.set_defaults(func=_admin)
    rotate_token = admin.add_parser(
        "rotate-postback-token",
        help="a new postback token for an account; the old one keeps working for --grace-hours (default 72)",
    )
    rotate_token.add_argument("--account-id", type=int, required=True)
    rotate_token.add_argument(
        "--grace-hours", type=float, default=72.0,
        help="how long the replaced token still works while networks move to the new one (0: it stops now)",
    )
    rotate_token.set_defaults(func=_admin)
    admin.add_parser(
        "forget-postback-tokens",
        help="empty the plaintext postback tokens a release before 0026 kept (once no gateway of one runs)",
    ).set_defaults(func=_admin)
    admin.add_parser(
        "republish", help="write every link, message code and offer to the edge's Redis again (after it lost its data)"
    ).set_defaults(func=cmd_republish)
    return parser




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error
        return int(exc.code or 0)
    # Every command may start the embedded servers (with_backends): a SIGTERM or SIGHUP must end it
    # through its finally, which stops them (`trackly run` then puts its own handlers in place).
    exit_on_sigterm()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
