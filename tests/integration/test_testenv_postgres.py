"""The postgres part: a real PostgreSQL the Prefect server of the production topology runs on."""
import asyncio

import asyncpg


def test_postgres_answers_and_makes_databases(postgres_env, testenv_config):
    from testenv import postgres

    assert postgres_env["host"] == "127.0.0.1" and postgres_env["url"].startswith("postgresql+asyncpg://")
    assert postgres.up(testenv_config) == postgres_env  # idempotent: same port, password, pid
    url = postgres.database(testenv_config, "fw_probe", fresh=True)

    async def probe():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.execute("CREATE TABLE t (x int)")
            await conn.execute("INSERT INTO t VALUES (1), (2)")
            return await conn.fetchval("SELECT sum(x) FROM t"), await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(probe()) == (3, "fleetwright")
    st = postgres.status(testenv_config)
    assert st["running"] and st["ready"] and "password" not in st and "url" not in st
    # a fresh database is empty again
    url = postgres.database(testenv_config, "fw_probe", fresh=True)

    async def tables():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 't'")
        finally:
            await conn.close()

    assert asyncio.run(tables()) == 0
