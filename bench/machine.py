"""The machine a benchmark ran on: CPU, memory, Python, package and server versions."""

from __future__ import annotations

import os
import platform
import sqlite3
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "tidings",
    "aiohttp",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "aiosqlite",
    "psycopg",
    "aio-pika",
    "httpx",
    "celery",
    "kombu",
    "matplotlib",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def postgres_version() -> str:
    """The local PostgreSQL server's version, or why it is unknown."""
    try:
        import psycopg

        from bench.systems.tidings_system import PG_ADMIN_DSN

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "unknown"
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def describe(rabbitmq_version: str) -> dict[str, str]:
    """Everything a reader needs to compare these figures with theirs."""
    info = {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores "
        f"({len(os.sched_getaffinity(0))} usable)",
        "memory": _memory_gib(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": postgres_version(),
        "RabbitMQ": rabbitmq_version,
    }
    info.update({package: _version(package) for package in PACKAGES})
    return info
