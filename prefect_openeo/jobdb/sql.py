"""A job database on SQLAlchemy: an SQLite file by default, PostgreSQL for shared use.

It implements openeo's ``JobDatabaseInterface`` and scales with what changes, not with the table:
statuses are indexed, ``persist`` writes only the rows it is given, and nothing reads the whole table in
a sweep. Several workers (flow runs on one machine or many) can work one PostgreSQL database at once:
rows are claimed atomically with a lease that expires if a worker dies, so no row is started twice and
a dead worker's rows are taken over, and per-backend slot budgets hold across workers.

The bookkeeping columns are real SQL columns; every other column of a row (your parameters, usage
fields, geometry as WKT) lives in a JSON column, so any dataframe round-trips.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from openeo.extra.job_management import JobDatabaseInterface
from openeo.util import rfc3339

from prefect_openeo.jobdb.files import JobDatabaseError, check_job_frame, get_job_db
from prefect_openeo.states import ACTIVE

#: Bookkeeping columns stored as SQL columns (with their SQL types).
COLUMNS: dict[str, Any] = {
    "status": sa.String(32),
    "id": sa.String(255),
    "backend_name": sa.String(255),
    "start_time": sa.String(64),
    "running_start_time": sa.String(64),
    "costs": sa.Float,
    "message": sa.Text,
    "create_token": sa.String(64),
    "retry_count": sa.Integer,
    "retry_after": sa.String(64),
}
#: Worker bookkeeping, not shown in dataframes.
_WORKER_COLUMNS = ("owner", "lease_until", "planned_backend")
_CHUNK = 1000


def _plain(value: Any) -> Any:
    """A JSON/SQL-friendly Python value."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "geom_type") and hasattr(value, "wkt"):
        return value.wkt
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.isoformat()
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    try:
        if pd.isna(value) is True:
            return None
    except (TypeError, ValueError):
        pass
    return value


class SqlJobDatabase(JobDatabaseInterface):
    """Job database in a SQL table; ``url`` is an SQLAlchemy URL or a path to an SQLite file.

    :param table: table name (a second table ``{table}_meta`` holds column order, geometry and CRS).
    :param worker_id: this worker's name for row claims (default: host, pid and a random suffix).
    :param lease_seconds: how long a claim lasts without renewal; a dead worker's rows are taken over after it.
    """

    def __init__(
        self,
        url: str | Path,
        table: str = "openeo_jobs",
        *,
        worker_id: str | None = None,
        lease_seconds: float = 300.0,
    ):
        url = str(url)
        if "://" not in url:
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        self.url = url
        self.table_name = table
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = float(lease_seconds)
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
        self.engine = sa.create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._meta_cache: dict[str, Any] | None = None
        self._define(index_type=sa.BigInteger)

    def __repr__(self) -> str:
        return f"SqlJobDatabase({self.engine.url.render_as_string(hide_password=True)!r}, table={self.table_name!r})"

    # -- schema -----------------------------------------------------------------------------------
    def _define(self, index_type: Any) -> None:
        md = sa.MetaData()
        self.table = sa.Table(
            self.table_name,
            md,
            sa.Column("idx", index_type, primary_key=True),
            *(sa.Column(name, type_) for name, type_ in COLUMNS.items()),
            sa.Column("owner", sa.String(255)),
            sa.Column("lease_until", sa.Float),
            sa.Column("planned_backend", sa.String(255)),
            sa.Column("data", sa.Text),
            sa.Index(f"ix_{self.table_name}_status_idx", "status", "idx"),
            sa.Index(f"ix_{self.table_name}_id", "id"),
        )
        self.meta = sa.Table(
            f"{self.table_name}_meta",
            md,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text),
        )
        self._md = md

    def exists(self) -> bool:
        return sa.inspect(self.engine).has_table(self.table_name)

    def _meta(self) -> dict[str, Any]:
        if self._meta_cache is None:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(self.meta.c.key, self.meta.c.value)).all()
            self._meta_cache = {k: json.loads(v) for k, v in rows}
            if self._meta_cache.get("index_type") == "text":
                self._define(index_type=sa.String(255))
        return self._meta_cache

    def _set_meta(self, conn: sa.Connection, **values: Any) -> None:
        for key, value in values.items():
            conn.execute(sa.delete(self.meta).where(self.meta.c.key == key))
            conn.execute(sa.insert(self.meta).values(key=key, value=json.dumps(value)))
        self._meta_cache = None

    # -- creating ---------------------------------------------------------------------------------
    def initialize_from_df(self, df: pd.DataFrame, *, on_exists: str = "error") -> SqlJobDatabase:
        """Create the table from a dataframe (normalized like openeo's job databases)."""
        if self.exists():
            if on_exists == "skip":
                return self
            if on_exists == "error":
                raise FileExistsError(f"Job database {self!r} already exists.")
            raise ValueError(f"Invalid on_exists={on_exists!r}")
        from openeo.extra.job_management._manager import MultiBackendJobManager as _Upstream

        df = _Upstream._column_requirements.normalize_df(df)
        if not df.index.is_unique:
            raise JobDatabaseError(f"Job database {self!r}: duplicate index values in the dataframe")
        check_job_frame(df, source=repr(self))
        integer_index = pd.api.types.is_integer_dtype(df.index.dtype)
        self._define(index_type=sa.BigInteger if integer_index else sa.String(255))
        geometry = getattr(df, "_geometry_column_name", None) if hasattr(df, "crs") else None
        crs = df.crs.to_string() if geometry and df.crs is not None else None
        self._md.create_all(self.engine)
        with self.engine.begin() as conn:
            self._set_meta(
                conn,
                columns=[str(c) for c in df.columns],
                index_type="integer" if integer_index else "text",
                geometry=geometry,
                crs=crs,
            )
            records = [self._record(index, row) for index, row in zip(df.index, df.to_dict("records"), strict=True)]
            for start in range(0, len(records), _CHUNK):
                conn.execute(sa.insert(self.table), records[start : start + _CHUNK])
        return self

    @classmethod
    def from_file(cls, path: str | Path, url: str | Path, table: str = "openeo_jobs", **kwargs: Any) -> SqlJobDatabase:
        """Import a CSV/Parquet/GeoParquet job database (geometry and statuses kept)."""
        db = cls(url, table, **kwargs)
        return db.initialize_from_df(get_job_db(path).read())

    def export(self, path: str | Path) -> Path:
        """Write the whole table to a CSV/Parquet/GeoParquet file (by extension), atomically."""
        from prefect_openeo.jobdb.files import AtomicCsvJobDatabase, AtomicParquetJobDatabase

        path = Path(path)
        target = get_job_db(path)
        if path.exists():
            raise FileExistsError(f"{path} exists")
        assert isinstance(target, (AtomicCsvJobDatabase, AtomicParquetJobDatabase))
        target.persist(self.read())
        return path

    # -- reading ----------------------------------------------------------------------------------
    def _record(self, index: Any, row: dict) -> dict:
        record: dict[str, Any] = {"idx": _plain(index)}
        data = {}
        for key, value in row.items():
            value = _plain(value)
            if key in COLUMNS:
                record[key] = value
            elif key not in _WORKER_COLUMNS:
                data[str(key)] = value
        for key in COLUMNS:
            record.setdefault(key, None)
        record["data"] = json.dumps(data, default=str)
        return record

    def _frame(self, rows: Iterable[sa.Row]) -> pd.DataFrame:
        meta = self._meta()
        records, index = [], []
        for row in rows:
            mapping = row._mapping
            record = json.loads(mapping["data"] or "{}")
            for key in COLUMNS:
                record[key] = mapping[key]
            records.append(record)
            index.append(mapping["idx"])
        columns = list(meta.get("columns") or [])
        extra = dict.fromkeys(c for r in records for c in r if c not in columns)
        # Bookkeeping columns the table never had show up once some row has a value in them.
        columns += [c for c in extra if c not in COLUMNS or any(r.get(c) is not None for r in records)]
        df = pd.DataFrame(records, index=pd.Index(index, dtype=object if not index else None), columns=columns)
        if "costs" in df.columns:
            df["costs"] = pd.to_numeric(df["costs"], errors="coerce")
        geometry = meta.get("geometry")
        if geometry and geometry in df.columns:
            import geopandas as gpd

            df[geometry] = gpd.GeoSeries.from_wkt(df[geometry].where(df[geometry].notna(), None), index=df.index)
            df = gpd.GeoDataFrame(df, geometry=geometry, crs=meta.get("crs"))
        return df

    def _select(self, where: Any = None, limit: int | None = None) -> pd.DataFrame:
        self._meta()
        query = sa.select(self.table).order_by(self.table.c.idx)
        if where is not None:
            query = query.where(where)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return self._frame(conn.execute(query))

    def read(self) -> pd.DataFrame:
        """The whole table as a dataframe (for export and inspection; the engine never needs it)."""
        return self._select()

    def count_by_status(self, statuses: Iterable[str] = ()) -> dict:
        statuses = list(statuses)
        query = sa.select(self.table.c.status, sa.func.count()).group_by(self.table.c.status)
        if statuses:
            query = query.where(self.table.c.status.in_(statuses))
        with self.engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    def get_by_status(self, statuses: list[str], max: int | None = None) -> pd.DataFrame:  # noqa: A002
        return self._select(self.table.c.status.in_(list(statuses)), limit=max)

    def get_by_indices(self, indices: Iterable[int | str]) -> pd.DataFrame:
        indices = [_plain(i) for i in indices]
        frames = [
            self._select(self.table.c.idx.in_(indices[start : start + _CHUNK]))
            for start in range(0, len(indices), _CHUNK)
        ]
        return pd.concat(frames) if len(frames) > 1 else (frames[0] if frames else self._select(sa.false()))

    # -- writing ----------------------------------------------------------------------------------
    def persist(self, df: pd.DataFrame) -> None:
        """Upsert the given rows (only those), merging their columns into what is stored."""
        if df.empty:
            return
        if not self.exists():
            self.initialize_from_df(df)
            return
        meta = self._meta()
        with self.engine.begin() as conn:
            indices = [_plain(i) for i in df.index]
            stored = {}
            for start in range(0, len(indices), _CHUNK):
                query = sa.select(self.table).where(self.table.c.idx.in_(indices[start : start + _CHUNK]))
                stored.update({row._mapping["idx"]: row._mapping for row in conn.execute(query)})
            new_columns = [str(c) for c in df.columns if str(c) not in meta.get("columns", []) and c not in COLUMNS]
            if new_columns:
                self._set_meta(conn, columns=list(meta.get("columns", [])) + new_columns)
            for index, row in zip(indices, df.to_dict("records"), strict=True):
                update = self._record(index, row)
                old = stored.get(index)
                if old is None:
                    conn.execute(sa.insert(self.table).values(**update))
                    continue
                data = json.loads(old["data"] or "{}")
                data.update(json.loads(update["data"]))
                values = {key: update[key] for key in COLUMNS if key in row}
                values["data"] = json.dumps(data, default=str)
                conn.execute(sa.update(self.table).where(self.table.c.idx == index).values(**values))

    # -- shared use: claims with leases -----------------------------------------------------------
    def _lock(self, conn: sa.Connection) -> None:
        """Serialize claim decisions across workers (PostgreSQL advisory lock; SQLite locks on write)."""
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(self.table_name.encode()[:8].ljust(8, b"\0"), "big") & 0x7FFFFFFFFFFFFFFF
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        else:
            conn.execute(sa.update(self.meta).where(sa.false()).values(value=None))  # take SQLite's write lock

    def claim_active(self) -> pd.DataFrame:
        """Active rows to track: this worker's, plus those whose owner's lease expired (taken over)."""
        now = time.time()
        t = self.table
        mine = sa.or_(t.c.owner == self.worker_id, t.c.owner.is_(None), t.c.lease_until < now)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.status.in_(ACTIVE), mine)
                .values(owner=self.worker_id, lease_until=now + self.lease_seconds)
            )
        return self._select(sa.and_(t.c.status.in_(ACTIVE), t.c.owner == self.worker_id))

    def claim_new(self, budgets: dict[str, int], order: list[str], max_rows: int = 200) -> pd.DataFrame:
        """Atomically pick ``not_started`` rows for backends with free slots (counted over all workers),
        record a creation token and this worker's claim on each, and return them with ``planned_backend``.
        """
        from prefect_openeo.engine import assign_rows
        from prefect_openeo.states import PENDING

        t = self.table
        now = time.time()
        live = sa.or_(t.c.owner == self.worker_id, t.c.lease_until >= now)
        with self.engine.begin() as conn:
            self._lock(conn)
            active = dict(
                conn.execute(
                    sa.select(t.c.backend_name, sa.func.count())
                    .where(t.c.status.in_(ACTIVE))
                    .group_by(t.c.backend_name)
                ).all()
            )
            reserved = dict(
                conn.execute(
                    sa.select(t.c.planned_backend, sa.func.count())
                    .where(
                        t.c.status.in_(PENDING), t.c.create_token.is_not(None), t.c.planned_backend.is_not(None), live
                    )
                    .group_by(t.c.planned_backend)
                ).all()
            )
            free = {name: budgets.get(name, 0) - active.get(name, 0) - reserved.get(name, 0) for name in order}
            total = sum(max(0, f) for f in free.values())
            if total <= 0:
                return self._select(sa.false())
            claimable = sa.and_(
                t.c.status.in_(PENDING),
                sa.or_(t.c.owner.is_(None), t.c.lease_until < now),
                sa.or_(t.c.retry_after.is_(None), t.c.retry_after <= rfc3339.now_utc()),
            )
            query = sa.select(t).where(claimable).order_by(t.c.idx).limit(max(max_rows, 4 * total))
            candidates = self._frame(conn.execute(query))
            plan = assign_rows(candidates, free, order)
            chosen = []
            for backend, indices in plan.items():
                for index in indices:
                    token = f"poj-{uuid.uuid4().hex[:12]}"
                    conn.execute(
                        sa.update(t)
                        .where(t.c.idx == _plain(index))
                        .values(
                            owner=self.worker_id,
                            lease_until=now + self.lease_seconds,
                            planned_backend=backend,
                            create_token=token,
                        )
                    )
                    candidates.at[index, "create_token"] = token
                    chosen.append((index, backend))
        if not chosen:
            return candidates.iloc[0:0]
        out = candidates.loc[[i for i, _ in chosen]].copy()
        out["planned_backend"] = [b for _, b in chosen]
        return out

    def unclaim(self, indices: Iterable[Any]) -> None:
        """Give back claimed ``not_started`` rows this worker will not create after all."""
        t = self.table
        indices = [_plain(i) for i in indices]
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.idx.in_(indices), t.c.owner == self.worker_id, t.c.status == "not_started")
                .values(owner=None, lease_until=None, planned_backend=None, create_token=None)
            )

    def stale_creations(self) -> pd.DataFrame:
        """``not_started`` rows with a creation token that no live worker holds (a crashed creation)."""
        t = self.table
        now = time.time()
        orphaned = sa.or_(t.c.owner.is_(None), t.c.owner == self.worker_id, t.c.lease_until < now)
        return self._select(sa.and_(t.c.status == "not_started", t.c.create_token.is_not(None), orphaned))

    def unknown_backends(self, statuses: list[str], known: list[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` naming a backend not in ``known`` (at most 10)."""
        t = self.table
        where = sa.and_(t.c.status.in_(statuses), t.c.backend_name.is_not(None), t.c.backend_name.not_in(known))
        return self._select(where, limit=10)

    def release(self) -> None:
        """Give up this worker's claims (at the end of a run), so others need not wait for leases."""
        with self.engine.begin() as conn:
            t = self.table
            conn.execute(sa.update(t).where(t.c.owner == self.worker_id).values(owner=None, lease_until=None))

    def drop(self) -> None:
        """Delete the table (tests, tooling)."""
        self._md.drop_all(self.engine)
        self._meta_cache = None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
