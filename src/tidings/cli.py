"""The `tidings` command: run the service, send and inspect notifications, run the demo."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tidings.errors import TidingsError

if TYPE_CHECKING:
    from tidings.client import Client

app = typer.Typer(
    help="Tidings: best-effort notification with retries and reconciliation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
endpoints_app = typer.Typer(help="Add, list and remove endpoints.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys, made directly in the store.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
demo_app = typer.Typer(help="Play worked examples on 127.0.0.1.", no_args_is_help=True)
app.add_typer(endpoints_app, name="endpoints")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(demo_app, name="demo")

_state = {"verbose": False}
# Where the client commands look for the API unless told (TIDINGS_URL, --url): the port a
# `tidings serve` started from the same environment listens on.
DEFAULT_URL = f"http://127.0.0.1:{os.environ.get('TIDINGS_PORT') or 8080}"

UrlOption = Annotated[
    str, typer.Option("--url", envvar="TIDINGS_URL", help="Base URL of the Tidings API.")
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="TIDINGS_API_KEY", help="API key.")
]
HostOption = Annotated[str, typer.Option("--host", envvar="TIDINGS_HOST")]
PortOption = Annotated[int, typer.Option("--port", envvar="TIDINGS_PORT")]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", envvar="TIDINGS_DATABASE_URL", help="SQLAlchemy async URL."),
]
LogLevelOption = Annotated[str, typer.Option("--log-level", envvar="TIDINGS_LOG_LEVEL")]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks.")] = False,
) -> None:
    _state["verbose"] = verbose


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _client(url: str, api_key: str | None) -> Client:
    from tidings.client import Client

    return Client(url, api_key)


# running -------------------------------------------------------------------------------


def _serve(host: str, port: int, database_url: str | None, log_level: str, mode: str) -> None:
    import uvicorn

    from tidings.api.app import create_app
    from tidings.logs import configure
    from tidings.service import Service
    from tidings.settings import Settings

    configure(log_level)
    if database_url:
        os.environ["TIDINGS_DATABASE_URL"] = database_url
    settings = Settings(host=host, port=port)  # so Settings.check() sees the real address
    service = Service(settings, run_dispatcher=mode != "api")
    typer.echo(
        f"Tidings {mode} on http://{host}:{port} (store: {_redact(settings.database_url)}); "
        f"API docs at http://{host}:{port}/docs",
        err=True,
    )
    config = uvicorn.Config(
        create_app(service, on_started=_announce_admin_key),
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
    )
    uvicorn.Server(config).run()


async def _announce_admin_key(service: Any) -> None:
    """On first start, make an admin key, save it (mode 0600) and print it once."""
    plain = await service.ensure_admin_key()
    path = service.settings.admin_key_file
    if plain is not None:
        _save_secret(path, plain)
        typer.echo(
            f"First start: admin API key (shown once; also saved to {path}):\n  {plain}\n"
            f"Use it as: curl -H 'Authorization: Bearer {plain}' ...",
            err=True,
        )
    elif service.settings.auth_required:
        typer.echo(f"Authentication is on; the first admin API key was saved to {path}", err=True)


def _save_secret(path: str, plain: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plain + "\n")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@app.command()
def serve(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8080,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Run the API and a dispatcher in one process."""
    _serve(host, port, database_url, log_level, "serve")


@app.command()
def api(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8080,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Run only the API (dispatchers run elsewhere)."""
    _serve(host, port, database_url, log_level, "api")


@app.command()
def dispatcher(database_url: DatabaseOption = None, log_level: LogLevelOption = "info") -> None:
    """Run only a dispatcher; start as many as the store and broker can feed."""
    from tidings.logs import configure
    from tidings.runner import run, run_dispatcher
    from tidings.settings import Settings

    configure(log_level)
    if database_url:
        os.environ["TIDINGS_DATABASE_URL"] = database_url
    run(run_dispatcher(Settings()))


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOption = None) -> None:
    """Apply the schema migrations to the database."""
    from tidings.settings import Settings
    from tidings.stores.engine import create_engine_for
    from tidings.stores.migrate import upgrade_async

    url = database_url or Settings().database_url

    async def upgrade() -> None:
        engine = create_engine_for(url)
        try:
            await upgrade_async(engine)
        finally:
            await engine.dispose()

    asyncio.run(upgrade())
    typer.echo(f"schema is up to date in {_redact(url)}")


@app.command()
def purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")
    ] = False,
    database_url: DatabaseOption = None,
) -> None:
    """Purge final notifications kept past their retention (a dispatcher does it too)."""
    from tidings.retention import RetentionPolicy
    from tidings.retention import purge as purge_expired
    from tidings.stores.sql import SqlStore

    async def work(service: Any) -> Any:
        if not isinstance(service.store, SqlStore):
            raise TidingsError("purge needs a SQL store; the in-memory store keeps nothing")
        policy = RetentionPolicy.from_settings(service.settings)
        report = await purge_expired(
            service.store.engine,
            now=service.clock.now(),
            policy=policy,
            batch=service.settings.purge_batch,
            dry_run=dry_run,
        )
        return policy, report

    policy, report = _with_service(database_url, work)
    typer.echo(f"retention: {policy.describe()}")
    typer.echo(f"{'would purge' if dry_run else 'purged'} {report.describe()}")


# API keys ------------------------------------------------------------------------------


def _with_service(database_url: str | None, work: Any) -> Any:
    from tidings.service import Service
    from tidings.settings import Settings

    settings = Settings(database_url=database_url) if database_url else Settings()

    async def run() -> Any:
        service = Service(settings, run_dispatcher=False)
        await service.start()
        try:
            return await work(service)
        finally:
            await service.stop()

    return asyncio.run(run())


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help="admin, notifier or receiver")],
    name: str = "",
    topic: Annotated[list[str] | None, typer.Option("--topic", help="notifier topics")] = None,
    endpoint: Annotated[
        list[str] | None, typer.Option("--endpoint", help="receiver endpoint ids")
    ] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Make an API key and print it once."""
    from tidings.auth import Scope

    try:
        chosen = Scope(scope)
    except ValueError as exc:
        raise TidingsError(f"--scope must be admin, notifier or receiver, not {scope!r}") from exc

    async def work(service: Any) -> Any:
        return await service.create_key(
            chosen, name=name, topics=tuple(topic or ["*"]), endpoint_ids=tuple(endpoint or [])
        )

    made = _with_service(database_url, work)
    typer.echo(f"{made.record.id} {made.record.scope.value}: {made.plain}")
    typer.echo("The key is shown only now; keep it somewhere safe.", err=True)


@keys_app.command("list")
def keys_list(database_url: DatabaseOption = None) -> None:
    """List API keys (never their plain text)."""

    async def work(service: Any) -> Any:
        return await service.store.list_keys()

    for key in _with_service(database_url, work):
        state = "revoked" if key.revoked else "active"
        scope_of = ",".join(key.topics if key.scope.value == "notifier" else key.endpoint_ids)
        typer.echo(f"{key.id}  {key.scope.value:<9} {state:<8} {key.name} {scope_of}".rstrip())


@keys_app.command("revoke")
def keys_revoke(key_id: str, database_url: DatabaseOption = None) -> None:
    """Revoke an API key at once."""

    async def work(service: Any) -> Any:
        await service.revoke_key(key_id)

    _with_service(database_url, work)
    typer.echo(f"revoked {key_id}")


# notifier and receiver ------------------------------------------------------------------


@app.command()
def send(
    topic: str,
    payload: Annotated[str, typer.Argument(help="JSON payload, or @file to read it from.")],
    key: Annotated[str | None, typer.Option(help="Business key, e.g. the recharge id.")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Send a notification with a JSON payload."""
    text = payload
    if payload.startswith("@"):
        with open(payload[1:], encoding="utf-8") as handle:
            text = handle.read()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise TidingsError(f"payload is not valid JSON: {exc}") from exc
    with _client(url, api_key) as client:
        _print(client.send(topic, value, key=key, idempotency_key=idempotency_key))


@app.command()
def status(
    notification_id: str, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None
) -> None:
    """Show a notification, its deliveries and every attempt."""
    with _client(url, api_key) as client:
        _print(client.get(notification_id))


@app.command("list")
def list_(
    topic: str | None = None,
    key: str | None = None,
    status: str | None = None,
    created_after: str | None = None,
    cursor: str | None = None,
    limit: int = 20,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List notifications, oldest first."""
    with _client(url, api_key) as client:
        _print(
            client.page(
                topic=topic,
                key=key,
                status=status,
                created_after=created_after,
                cursor=cursor,
                limit=limit,
            )
        )


@app.command()
def redeliver(
    notification_id: str, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None
) -> None:
    """Attempt every undelivered delivery of a notification now."""
    with _client(url, api_key) as client:
        _print(client.redeliver(notification_id))


@app.command()
def relay(
    source: Annotated[
        str,
        typer.Option(
            "--source",
            envvar="TIDINGS_OUTBOX_URL",
            help="SQLAlchemy URL of the notifier's database holding the outbox.",
        ),
    ],
    tidings_url: Annotated[
        str, typer.Option("--tidings-url", envvar="TIDINGS_URL", help="Base URL of the API.")
    ] = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    table: Annotated[str, typer.Option(help="Outbox table, or schema.table.")] = "tidings_outbox",
    interval_s: Annotated[float, typer.Option("--interval-s", min=0.01)] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    once: Annotated[bool, typer.Option("--once", help="Relay what is pending, then exit.")] = False,
    log_level: LogLevelOption = "info",
) -> None:
    """Move committed outbox rows to Tidings, oldest first; runs until SIGTERM/SIGINT."""
    from tidings.logs import configure
    from tidings.outbox.relay import main as relay_main

    configure(log_level)
    report = relay_main(
        source=source,
        tidings_url=tidings_url,
        api_key=api_key,
        table_name=table,
        interval_s=interval_s,
        batch_size=batch_size,
        once=once,
    )
    if report is not None:
        typer.echo(f"relayed {report.relayed} rows, rejected {report.rejected}")


@app.command()
def subscribe(
    topic: str,
    group: Annotated[
        str, typer.Option("--group", "-g", help="Subscriber group: one queue, one endpoint.")
    ],
    command: Annotated[
        str,
        typer.Option(
            "--exec",
            help="Shell command run per message: body on stdin; TIDINGS_NOTIFICATION_ID, "
            "TIDINGS_ATTEMPT, TIDINGS_TOPIC in its environment; exit 0 = handled.",
        ),
    ],
    broker_url: Annotated[
        str, typer.Option("--broker-url", envvar="TIDINGS_BROKER_URL", help="RabbitMQ URL.")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    prefix: Annotated[
        str, typer.Option("--prefix", envvar="TIDINGS_BROKER_PREFIX", help="Queue name prefix.")
    ] = "tidings",
    schedule: Annotated[
        str | None, typer.Option(help="For a new group: preset or '10s,1m,5m'.")
    ] = None,
    window: Annotated[str | None, typer.Option(help="For a new group: e.g. 24h")] = None,
    timeout: Annotated[
        str, typer.Option(help="Time one message may take; the command is killed after it.")
    ] = "30s",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Run a command for every notification of TOPIC, as subscriber group G, until stopped."""
    import signal

    from tidings.durations import parse_duration_s
    from tidings.logs import configure
    from tidings.runner import run
    from tidings.subscriber import Subscriber, command_handler

    configure(log_level)
    ladder: Any = schedule.split(",") if schedule and "," in schedule else schedule
    subscriber = Subscriber(
        broker_url,
        topic=topic,
        group=group,
        tidings_url=url,
        api_key=api_key,
        prefix=prefix,
        retry_schedule=ladder,
        window=window,
        timeout=timeout,
    )
    handler = command_handler(command, timeout_s=parse_duration_s(timeout, field="timeout"))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await subscriber.run(handler, stop)

    run(main())


# endpoints ------------------------------------------------------------------------------


@endpoints_app.command("add")
def endpoints_add(
    endpoint_url: Annotated[str, typer.Argument(metavar="URL")],
    topic: Annotated[list[str], typer.Option("--topic", "-t", help="Repeat for more.")],
    schedule: Annotated[str | None, typer.Option(help="Preset or '10s,1m,5m'.")] = None,
    window: Annotated[str | None, typer.Option(help="e.g. 24h")] = None,
    token: Annotated[str | None, typer.Option(help="Success body token, e.g. success.")] = None,
    timeout: Annotated[str | None, typer.Option(help="e.g. 10s")] = None,
    secret: str | None = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Register an endpoint; prints its secret once."""
    ladder: Any = schedule.split(",") if schedule and "," in schedule else schedule
    with _client(url, api_key) as client:
        _print(
            client.add_endpoint(
                endpoint_url,
                topic,
                retry_schedule=ladder,
                window=window,
                success={"token": token} if token else None,
                timeout=timeout,
                secret=secret,
            )
        )


@endpoints_app.command("list")
def endpoints_list(url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """List endpoints."""
    with _client(url, api_key) as client:
        _print(client.endpoints())


@endpoints_app.command("remove")
def endpoints_remove(
    endpoint_id: str, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None
) -> None:
    """Remove an endpoint; its unfinished deliveries are cancelled."""
    with _client(url, api_key) as client:
        client.remove_endpoint(endpoint_id)
    typer.echo(f"removed {endpoint_id}")


# demo -----------------------------------------------------------------------------------


@demo_app.command("recharge")
def demo_recharge(
    recharges: Annotated[int, typer.Option(help="How many recharges to play.")] = 8,
    port: Annotated[int, typer.Option(help="First of the ports to use.")] = 18080,
) -> None:
    """The recharge example: a notifier, a flaky receiver, reconciliation; exits 1 if
    any recharge ends inconsistent."""
    from tidings.demo.recharge import run_demo

    consistent = asyncio.run(run_demo(recharges=recharges, base_port=port))
    raise typer.Exit(0 if consistent else 1)


def _one_line(exc: BaseException) -> str:
    """An error as one line; a bad setting names its TIDINGS_* variable."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = [
            f"TIDINGS_{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        ]
        return "invalid setting: " + "; ".join(problems)
    return " ".join(str(exc).split())


def main() -> None:
    """Entry point: one line per error, exit 1; tracebacks only with -v."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (TidingsError, OSError, ValueError) as exc:
        if _state["verbose"]:
            traceback.print_exc()
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if _state["verbose"]:
            traceback.print_exc()
            typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        typer.echo(f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
        sys.exit(1)
