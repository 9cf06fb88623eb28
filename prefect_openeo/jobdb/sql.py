"""A job database on SQLAlchemy: an SQLite file by default, PostgreSQL for shared use.

It implements openeo's ``JobDatabaseInterface`` and scales with what changes, not with the table:
statuses are indexed, ``persist`` writes only the rows it is given, and nothing reads the whole table in
a sweep. Several workers (flow runs on one machine or many) can work one database at once. It is the
single record of every row's progress:

- **creation intent**: a row's ``create_token`` and ``planned_backend`` are recorded (with the claiming
  worker) before its job is created; such a row keeps its token, and holds its backend slot, until the
  backend's job listing has been searched for it (``claim_unresolved``);
- **who holds a row**: ``owner`` and ``lease_until``; a worker on the same machine sees at once that an
  owner's process is gone (``prefect_openeo.jobdb.owners``), others wait for the lease to expire. A worker
  never overwrites a row that another live worker holds;
- **downloads**: ``results`` is ``pending`` / ``done`` / ``failed`` / ``gone``; downloads are claimed like
  rows (``claim_downloads``);
- **one budget per backend**, recorded in the database, which every worker's claims obey;
- **a schema version**: an older table is upgraded in place where that is additive; anything else is a
  ``JobDatabaseError`` naming the table, the column and what to do.

The bookkeeping columns are real SQL columns; every other column of a row (your parameters, usage
fields, geometry as WKT) lives in a JSON column, so any dataframe round-trips.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from openeo.extra.job_management import JobDatabaseInterface
from openeo.util import rfc3339

from prefect_openeo import transitions
from prefect_openeo.jobdb.checks import check_job_frame
from prefect_openeo.jobdb.errors import JobDatabaseError
from prefect_openeo.jobdb.files import open_file
from prefect_openeo.jobdb.owners import is_dead, this_worker
from prefect_openeo.placement import assign_rows, free_slots, new_token, worker_room
from prefect_openeo.schema import COLUMN_REQUIREMENTS, RESULTS, UPSTREAM
from prefect_openeo.settings import settings
from prefect_openeo.states import ACTIVE, PENDING, TERMINAL
from prefect_openeo.transitions import Patch

_log = logging.getLogger("prefect_openeo")

#: Version of the table layout written by this code; recorded in the meta table.
SCHEMA_VERSION = 2
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
    "planned_backend": sa.String(255),
    "results": sa.String(16),
    "retry_count": sa.Integer,
    "retry_after": sa.String(64),
}
#: Bookkeeping columns every frame has (as openeo's ``normalize_df`` adds them).
UPSTREAM_COLUMNS = ("status", *(c for c in UPSTREAM if c != "status"))
#: Who holds a row; not shown in dataframes.
WORKER_COLUMNS: dict[str, Any] = {"owner": sa.String(255), "lease_until": sa.Float}
#: Columns without which a table is not a job database of ours.
REQUIRED_COLUMNS = ("idx", "status", "data")
#: The meta key of the workers claiming rows (worker id: when it last claimed), for their fair shares.
CLAIMANTS = "claimants"
_CHUNK = 1000


def _plain(value: Any) -> Any:
    """A JSON/SQL-friendly Python value (JSON has no NaN or infinity: they are stored as nothing)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
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
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    try:
        if pd.isna(value) is True:
            return None
    except (TypeError, ValueError):
        pass
    return value


class SqlJobDatabase(JobDatabaseInterface):
    """Job database in a SQL table; ``url`` is an SQLAlchemy URL or a path to an SQLite file.

    Several workers may share it (``shared``): they claim rows through it (``claim_*``).

    :param table: table name (a second table ``{table}_meta`` holds column order, geometry, CRS, budgets and
        the schema version).
    :param worker_id: a name for this worker's runs (recorded in the ``owner`` of the rows it holds, after
        the machine and process identity).
    :param lease_seconds: how long a claim lasts without renewal; workers on other machines take over a dead
        worker's rows after it (on the same machine: at once). Claims are renewed every sweep.
    """

    shared = True

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
        self.worker_id = str(this_worker(worker_id))
        self.lease_seconds = float(lease_seconds)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as e:
            raise JobDatabaseError(f"Job database URL {url!r} cannot be used: {e}") from e
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        self._meta_cache: dict[str, Any] | None = None
        self._schema_checked = False
        #: Free slots this worker left to others at its last claim (``placement.worker_room``).
        self._spare: dict[str, int] = {}
        self._define(index_type=sa.BigInteger)

    def __repr__(self) -> str:
        return f"SqlJobDatabase({self.engine.url.render_as_string(hide_password=True)!r}, table={self.table_name!r})"

    # -- schema -----------------------------------------------------------------------------------
    def _define(self, index_type: Any) -> None:
        #: Patch statements by shape (``_patch_statement``), built on this table definition.
        self._statements: dict[tuple, Any] = {}
        md = sa.MetaData()
        self.table = sa.Table(
            self.table_name,
            md,
            sa.Column("idx", index_type, primary_key=True),
            *(sa.Column(name, type_) for name, type_ in COLUMNS.items()),
            *(sa.Column(name, type_) for name, type_ in WORKER_COLUMNS.items()),
            sa.Column("data", sa.Text),
            sa.Index(f"ix_{self.table_name}_status_idx", "status", "idx"),
            sa.Index(f"ix_{self.table_name}_id", "id"),
            sa.Index(f"ix_{self.table_name}_owner", "owner"),
            # each sweep looks for unresolved creations and owed downloads among many rows
            sa.Index(f"ix_{self.table_name}_status_token", "status", "create_token"),
            sa.Index(f"ix_{self.table_name}_status_results", "status", "results"),
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

    @contextlib.contextmanager
    def _tx(self, table_lock: bool = True) -> Iterator[sa.Connection]:
        """A write transaction; with ``table_lock``, one that holds the table's lock, so that claims of new rows
        (which count every backend's active rows), upgrades and ``persist`` never interleave (PostgreSQL: a
        transaction-scoped advisory lock). Row-level writes (patches, claims of rows already on a backend,
        releases) take no table lock: each is one conditional UPDATE, which the database serializes per row.
        SQLite has one writer at a time anyway: ``BEGIN IMMEDIATE``."""
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                if table_lock and self.engine.dialect.name == "postgresql":
                    digest = int(uuid.uuid5(uuid.NAMESPACE_URL, f"prefect-openeo:{self.table_name}").hex[:15], 16)
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": digest})
                yield conn

    def _ready(self) -> None:
        """Check (and where additive, upgrade) the table's schema once, before first use."""
        if self._schema_checked:
            return
        if self.exists():
            self._check_schema()
        self._schema_checked = True

    def _check_schema(self) -> None:
        found = self._schema_problems(sa.inspect(self.engine))
        if not found:
            return
        with self._tx() as conn:
            missing = self._schema_problems(sa.inspect(conn))  # again, under the lock: another worker may have done it
            if missing:
                self._upgrade(conn, missing)
        self._meta_cache = None

    def _schema_problems(self, inspector: Any) -> list[str]:
        """What an additive upgrade must add (``column:NAME``, ``meta``, ``index:NAME``, ``version``);
        raises ``JobDatabaseError`` for what it cannot fix."""
        where = f"Job database table {self.table_name!r} in {self.engine.url.render_as_string(hide_password=True)}"
        columns = {c["name"]: c["type"] for c in inspector.get_columns(self.table_name)}
        absent = [c for c in REQUIRED_COLUMNS if c not in columns]
        if absent:
            raise JobDatabaseError(
                f"{where} has no column {absent[0]!r}: it was not made by prefect-openeo's SqlJobDatabase. "
                "Use another table name (table=...), or import a CSV/Parquet job database with "
                "SqlJobDatabase.from_file(path, url, table)."
            )
        todo = []
        for name, wanted in {**COLUMNS, **WORKER_COLUMNS}.items():
            if name not in columns:
                todo.append(f"column:{name}")
                continue
            self._check_type(where, name, columns[name], wanted)
        if not inspector.has_table(self.meta.name):
            todo.append("meta")
        else:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")).first()
            version = json.loads(row[0]) if row else 1
            if version > SCHEMA_VERSION:
                raise JobDatabaseError(
                    f"{where} has schema version {version}, newer than this prefect-openeo knows "
                    f"({SCHEMA_VERSION}): upgrade prefect-openeo on this worker."
                )
            if version < SCHEMA_VERSION:
                todo.append("version")
        indexes = {ix["name"] for ix in inspector.get_indexes(self.table_name)}
        todo += [f"index:{ix.name}" for ix in self.table.indexes if ix.name not in indexes]
        return todo

    def _check_type(self, where: str, name: str, found: Any, wanted: Any) -> None:
        wanted_type = wanted() if isinstance(wanted, type) else wanted
        if isinstance(wanted_type, sa.String):
            ok = isinstance(found, sa.String)
        elif isinstance(wanted_type, sa.Integer):
            ok = isinstance(found, sa.Integer)
        else:
            ok = isinstance(found, (sa.Numeric, sa.Float, sa.Integer))
        expected = wanted_type.compile(dialect=self.engine.dialect)
        quoted = self.engine.dialect.identifier_preparer.quote
        fix = f"ALTER TABLE {quoted(self.table_name)} ALTER COLUMN {quoted(name)} TYPE {expected}"
        if not ok:
            raise JobDatabaseError(
                f"{where}: column {name!r} has type {found}, expected {expected}. "
                f"Change it (e.g. `{fix}`) or use a new table."
            )
        length = getattr(wanted_type, "length", None)
        found_length = getattr(found, "length", None)
        if length and found_length and found_length < length and self.engine.dialect.name != "sqlite":
            raise JobDatabaseError(
                f"{where}: column {name!r} is {found}, narrower than the {expected} prefect-openeo writes. "
                f"Widen it: `{fix}`."
            )

    def _upgrade(self, conn: sa.Connection, todo: list[str]) -> None:
        quoted = self.engine.dialect.identifier_preparer.quote
        types = {**COLUMNS, **WORKER_COLUMNS}
        added = []
        for item in todo:
            kind, _, name = item.partition(":")
            if kind == "column":
                type_sql = (types[name]() if isinstance(types[name], type) else types[name]).compile(
                    dialect=self.engine.dialect
                )
                conn.execute(sa.text(f"ALTER TABLE {quoted(self.table_name)} ADD COLUMN {quoted(name)} {type_sql}"))
                added.append(name)
            elif kind == "index":
                next(ix for ix in self.table.indexes if ix.name == name).create(conn, checkfirst=True)
        if "meta" in todo:
            self.meta.create(conn, checkfirst=True)
            idx_type = next(c["type"] for c in sa.inspect(conn).get_columns(self.table_name) if c["name"] == "idx")
            self._write_meta(
                conn, columns=[], index_type="integer" if isinstance(idx_type, sa.Integer) else "text", geometry=None
            )
        self._write_meta(conn, schema_version=SCHEMA_VERSION)
        _log.warning(
            f"Upgraded job database table {self.table_name!r} to schema version {SCHEMA_VERSION}"
            + (f" (added columns {', '.join(added)})" if added else "")
        )

    def _meta(self) -> dict[str, Any]:
        if self._meta_cache is None:
            with self.engine.connect() as conn:
                self._meta_cache = self._read_meta(conn)
            if self._meta_cache.get("index_type") == "text":
                self._define(index_type=sa.String(255))
        return self._meta_cache

    def _read_meta(self, conn: sa.Connection) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in conn.execute(sa.select(self.meta.c.key, self.meta.c.value)).all()}

    def _write_meta(self, conn: sa.Connection, **values: Any) -> None:
        for key, value in values.items():
            conn.execute(sa.delete(self.meta).where(self.meta.c.key == key))
            conn.execute(sa.insert(self.meta).values(key=key, value=json.dumps(value)))
        self._meta_cache = None

    # -- creating ---------------------------------------------------------------------------------
    def initialize_from_df(self, df: pd.DataFrame, *, on_exists: str = "error") -> SqlJobDatabase:
        """Create the table from a dataframe (normalized like openeo's job databases).

        Safe when several workers do it at once: exactly one creates the table, the others find it
        (``on_exists="skip"``) or get ``FileExistsError`` (``"error"``).
        """
        if on_exists not in ("skip", "error"):
            raise ValueError(f"Invalid on_exists={on_exists!r}")
        df = COLUMN_REQUIREMENTS.normalize_df(df)
        if not df.index.is_unique:
            raise JobDatabaseError(f"Job database {self!r}: duplicate index values in the dataframe")
        check_job_frame(df, source=repr(self))
        integer_index = pd.api.types.is_integer_dtype(df.index.dtype)
        geometry = getattr(df, "active_geometry_name", None) if hasattr(df, "crs") else None
        crs = df.crs.to_string() if geometry and df.crs is not None else None
        records = [self._record(index, row) for index, row in zip(df.index, df.to_dict("records"), strict=True)]
        with self._tx() as conn:
            if sa.inspect(conn).has_table(self.table_name):
                if on_exists == "skip":
                    return self
                raise FileExistsError(f"Job database {self!r} already exists.")
            self._define(index_type=sa.BigInteger if integer_index else sa.String(255))
            self._md.create_all(conn)
            self._write_meta(
                conn,
                columns=[str(c) for c in df.columns],
                index_type="integer" if integer_index else "text",
                geometry=geometry,
                crs=crs,
                schema_version=SCHEMA_VERSION,
            )
            for start in range(0, len(records), _CHUNK):
                conn.execute(sa.insert(self.table), records[start : start + _CHUNK])
            if self.engine.dialect.name == "postgresql":  # statistics now: a row's update finds it by its key
                conn.execute(sa.text(f"ANALYZE {self.engine.dialect.identifier_preparer.quote(self.table_name)}"))
        self._schema_checked = True
        return self

    @classmethod
    def from_file(cls, path: str | Path, url: str | Path, table: str = "openeo_jobs", **kwargs: Any) -> SqlJobDatabase:
        """Import a CSV/Parquet/GeoParquet job database (geometry and statuses kept)."""
        db = cls(url, table, **kwargs)
        return db.initialize_from_df(open_file(path).read())

    def export(self, path: str | Path) -> Path:
        """Write the whole table to a CSV/Parquet/GeoParquet file (by extension), atomically."""
        path = Path(path)
        target = open_file(path)
        if path.exists():
            raise FileExistsError(f"{path} exists")
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
            elif key not in WORKER_COLUMNS:
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
        columns += [c for c in UPSTREAM_COLUMNS if c not in columns]  # as openeo's job databases always have
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
        self._ready()
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
        self._ready()
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
        """Upsert the given rows (only those), merging their columns into what is stored.

        A row that another live worker holds is not overwritten (its state is newer than ours); a row that
        ended (and owes no download) is released by its owner.
        """
        if df.empty:
            return
        if not self.exists():
            self.initialize_from_df(df)
            return
        self._ready()
        meta = self._meta()
        now = time.time()
        held: list = []
        with self._tx() as conn:
            indices = [_plain(i) for i in df.index]
            stored = {}
            for start in range(0, len(indices), _CHUNK):
                query = sa.select(self.table).where(self.table.c.idx.in_(indices[start : start + _CHUNK]))
                stored.update({row._mapping["idx"]: row._mapping for row in conn.execute(query)})
            new_columns = [str(c) for c in df.columns if str(c) not in meta.get("columns", []) and c not in COLUMNS]
            if new_columns:
                self._write_meta(conn, columns=list(meta.get("columns", [])) + new_columns)
            for index, row in zip(indices, df.to_dict("records"), strict=True):
                update = self._record(index, row)
                old = stored.get(index)
                if old is None:
                    conn.execute(sa.insert(self.table).values(**update))
                    continue
                if self._held_by_another(old["owner"], old["lease_until"], now):
                    held.append(index)
                    continue
                data = json.loads(old["data"] or "{}")
                data.update(json.loads(update["data"]))
                values = {key: update[key] for key in COLUMNS if key in row}
                values["data"] = json.dumps(data, default=str)
                status = values.get("status", old["status"])
                results = values.get("results", old["results"])
                if status in TERMINAL and results != "pending":
                    values.update(owner=None, lease_until=None)
                conn.execute(sa.update(self.table).where(self.table.c.idx == index).values(**values))
        if held:
            _log.warning(
                f"Not writing rows {held[:10]} of {self!r}: another live worker holds them now (their state there "
                "is newer than this worker's)"
            )

    @property
    def across_machines(self) -> bool:
        """A database server is; an SQLite file is on one machine's disk."""
        return self.engine.dialect.name != "sqlite"

    @property
    def job_db(self) -> SqlJobDatabase:
        """The job database of this job store: itself."""
        return self

    def apply(self, patches: Sequence[Patch], held: pd.DataFrame | None = None) -> list:
        """Apply patches row by row, each one conditional: only while the row still has the status the patch
        expects and no other live worker holds it (``owner`` this worker's, none, or its lease over). One
        UPDATE per row, no table lock; returns the indices whose patch landed. A row that ends (and owes no
        download) is released by its owner in the same statement. The statements are built once per shape
        (which cells, whether the row ends) and run with bound values."""
        merged = [(index, patch) for index, patch in transitions.merge(patches).items() if patch]
        if not merged:
            return []
        self._ready()
        now = time.time()
        landed = []
        with self._tx(table_lock=False) as conn:
            for index, patch in merged:
                columns = tuple(sorted(k for k in patch.cells if k in COLUMNS))
                data = {
                    str(k): _plain(v) for k, v in patch.cells.items() if k not in COLUMNS and k not in WORKER_COLUMNS
                }
                status = patch.status or patch.expect  # the row's status after the patch, where known
                if status is None:
                    release = "unknown"
                elif status not in TERMINAL or patch.cells.get(RESULTS, "") == "pending":
                    release = "no"
                else:
                    release = "yes" if RESULTS in patch.cells else "unless-owed"
                statement = self._patch_statement(columns, bool(data), patch.expect is not None, release)
                params = {f"v_{k}": _plain(patch.cells[k]) for k in columns}
                params.update(p_idx=_plain(index), p_me=self.worker_id, p_now=now, p_expect=patch.expect)
                if data:
                    params["p_data"] = json.dumps(data, default=str)
                if conn.execute(statement, params).rowcount:
                    landed.append(index)
        return landed

    def _patch_statement(self, columns: tuple[str, ...], data: bool, expect: bool, release: str) -> Any:
        """The conditional UPDATE of one row for a patch of this shape (cached)."""
        key = (columns, data, expect, release)
        cached = self._statements.get(key)
        if cached is not None:
            return cached
        t = self.table
        values: dict[str, Any] = {k: sa.bindparam(f"v_{k}", type_=t.c[k].type) for k in columns}
        if data:
            values["data"] = self._merged_data(sa.bindparam("p_data", type_=sa.Text))
        if release != "no":
            ended = sa.true() if release in ("yes", "unless-owed") else t.c.status.in_(TERMINAL)
            results = sa.bindparam(f"v_{RESULTS}") if RESULTS in columns else t.c.results
            released = sa.true() if release == "yes" else sa.and_(ended, sa.func.coalesce(results, "") != "pending")
            values["owner"] = None if release == "yes" else sa.case((released, None), else_=t.c.owner)
            values["lease_until"] = None if release == "yes" else sa.case((released, None), else_=t.c.lease_until)
        mine = sa.or_(t.c.owner == sa.bindparam("p_me"), t.c.owner.is_(None), t.c.lease_until < sa.bindparam("p_now"))
        where = sa.and_(t.c.idx == sa.bindparam("p_idx"), mine)
        if expect:
            where = sa.and_(where, t.c.status == sa.bindparam("p_expect"))
        statement = sa.update(t).where(where).values(**values)
        self._statements[key] = statement
        return statement

    def _merged_data(self, patch_json: Any) -> Any:
        """The ``data`` column with a JSON object's keys set (in the database: one statement, no read first)."""
        data = self.table.c.data
        text = patch_json if isinstance(patch_json, sa.BindParameter) else sa.literal(patch_json, sa.Text)
        # bound as text, then cast: a JSONB parameter would be encoded once more
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            merged = sa.func.coalesce(sa.cast(data, JSONB), sa.cast(sa.literal("{}", sa.Text), JSONB))
            return sa.cast(merged.op("||")(sa.cast(text, JSONB)), sa.Text)
        return sa.func.json_patch(sa.func.coalesce(data, "{}"), text)

    def _held_by_another(self, owner: str | None, lease_until: float | None, now: float) -> bool:
        return bool(owner) and owner != self.worker_id and (lease_until or 0) >= now and not is_dead(owner)

    # -- shared use: claims with leases -----------------------------------------------------------
    def _takeable(self, conn: sa.Connection, now: float) -> Any:
        """Rows this worker may claim: its own, unowned, expired, or held by a process that is gone."""
        t = self.table
        owners = conn.execute(  # only leases still running: an expired one is takeable anyway
            sa.select(t.c.owner)
            .where(t.c.owner.is_not(None), t.c.owner != self.worker_id, t.c.lease_until >= now)
            .distinct()
        ).scalars()
        dead = [owner for owner in owners if is_dead(owner)]
        return sa.or_(t.c.owner == self.worker_id, t.c.owner.is_(None), t.c.lease_until < now, t.c.owner.in_(dead))

    def prepare_run(self, budgets: Mapping[str, int]) -> dict[str, int]:
        """Start of a worker's run: record each backend's budget (``parallel_jobs``) where none is recorded,
        say which applies where this worker's differs, and give failed downloads another go.

        Returns the budget per backend that applies (the recorded one, which every worker's claims obey).
        """
        self._ready()
        with self._tx() as conn:
            recorded = dict(self._read_meta(conn).get("budgets") or {})
            for name, budget in budgets.items():
                if name not in recorded:
                    recorded[name] = int(budget)
                elif int(recorded[name]) != int(budget):
                    _log.warning(
                        f"Backend {name!r}: this worker's parallel_jobs={budget} differs from the budget "
                        f"{recorded[name]} recorded in the shared job database {self!r}; {recorded[name]} applies "
                        f"(to every worker). To change it for all workers: "
                        f"SqlJobDatabase(url, table).set_budget({name!r}, N)."
                    )
            self._write_meta(conn, budgets=recorded)
            t = self.table
            conn.execute(
                sa.update(t).where(t.c.status == "finished", t.c.results == "failed").values(results="pending")
            )
        return {name: int(recorded[name]) for name in budgets}

    def set_budget(self, backend: str, parallel_jobs: int) -> None:
        """Change a backend's budget for every worker of this database (applies from their next claim)."""
        if not isinstance(parallel_jobs, int) or parallel_jobs < 0:
            raise ValueError(f"parallel_jobs must be a non-negative int, got {parallel_jobs!r}")
        self._ready()
        with self._tx() as conn:
            recorded = dict(self._read_meta(conn).get("budgets") or {})
            recorded[backend] = parallel_jobs
            self._write_meta(conn, budgets=recorded)

    def budgets(self) -> dict[str, int]:
        """The budget per backend recorded in the database."""
        with self.engine.connect() as conn:
            return {k: int(v) for k, v in (self._read_meta(conn).get("budgets") or {}).items()}

    def claim_active(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        """Active rows to track: this worker's, plus those whose owner is gone (taken over); leases renewed.
        With ``backends``, only rows on those (a worker cannot track jobs on a backend it does not know)."""
        self._ready()
        now = time.time()
        t = self.table
        active = t.c.status.in_(ACTIVE)
        if backends is not None:  # rows without a backend are included: the engine marks them
            active = sa.and_(active, self._on(backends))
        with self._tx(table_lock=False) as conn:
            conn.execute(
                sa.update(t)
                .where(active, self._takeable(conn, now))
                .values(owner=self.worker_id, lease_until=now + self.lease_seconds)
            )
        return self._select(sa.and_(active, t.c.owner == self.worker_id))

    def claim_unresolved(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        """``not_started`` rows with a recorded creation token (a creation that may or may not have reached
        the backend) that no other live worker holds: claimed, for this worker to reconcile. With ``backends``,
        only creations planned on those (or on no recorded backend: older versions)."""
        self._ready()
        now = time.time()
        t = self.table
        unresolved = sa.and_(t.c.status.in_(PENDING), t.c.create_token.is_not(None))
        if backends is not None:
            planned = sa.or_(t.c.planned_backend.in_(list(backends)), t.c.planned_backend.is_(None))
            unresolved = sa.and_(unresolved, planned)
        with self._tx(table_lock=False) as conn:
            conn.execute(
                sa.update(t)
                .where(unresolved, self._takeable(conn, now))
                .values(owner=self.worker_id, lease_until=now + self.lease_seconds)
            )
        return self._select(sa.and_(unresolved, t.c.owner == self.worker_id))

    def claim_new(
        self,
        caps: Mapping[str, int],
        order: list[str],
        max_rows: int = 200,
        new_at_most: Mapping[str, int] | None = None,
    ) -> pd.DataFrame:
        """Atomically pick ``not_started`` rows for backends with free slots and record, on each, a creation
        token, the planned backend and this worker's claim; returns them (with ``planned_backend``).

        Free slots are the recorded budget less the active rows and unresolved creations of every worker,
        capped by ``caps`` (this worker's own limit per backend, e.g. 0 while its lane is busy); at most
        ``new_at_most`` rows per backend are picked. Workers
        that claimed within ``claimant_window`` seconds share a backend's budget fairly
        (``placement.worker_room``); each claim records this worker among them.
        """
        self._ready()
        t = self.table
        now = time.time()
        with self._tx() as conn:
            meta = self._read_meta(conn)
            recorded = meta.get("budgets") or {}
            workers = self._note_claimant(conn, meta.get(CLAIMANTS) or {}, now)
            budgets = {name: min(int(recorded.get(name, 0)), caps.get(name, 0)) for name in order}
            # Active rows and unresolved creations hold a backend's slots: counted in one statement (one
            # snapshot), as a row's patch may turn it from the one into the other meanwhile (no table lock).
            holds = sa.case((t.c.status.in_(ACTIVE), t.c.backend_name), else_=t.c.planned_backend)
            by_me = sa.func.coalesce(t.c.owner == self.worker_id, False)
            held: dict[str, int] = collections.Counter()
            mine: dict[str, int] = collections.Counter()
            for backend, is_mine, count in conn.execute(
                sa.select(holds, by_me, sa.func.count())
                .where(sa.or_(t.c.status.in_(ACTIVE), sa.and_(t.c.status.in_(PENDING), t.c.create_token.is_not(None))))
                .group_by(holds, by_me)
            ).all():
                held[backend] += count
                if is_mine:
                    mine[backend] += count
            shared_budgets = {name: int(recorded.get(name, 0)) for name in order}
            free, left = worker_room(free_slots(budgets, held, {}), shared_budgets, mine, workers, self._spare)
            self._spare = {**self._spare, **left}
            free = {name: min(f, (new_at_most or {}).get(name, f)) for name, f in free.items()}
            total = sum(max(0, f) for f in free.values())
            if total <= 0:
                return self._select(sa.false())
            claimable = sa.and_(
                t.c.status.in_(PENDING),
                t.c.create_token.is_(None),
                sa.or_(t.c.retry_after.is_(None), t.c.retry_after <= rfc3339.now_utc()),
            )
            query = sa.select(t).where(claimable).order_by(t.c.idx).limit(max(max_rows, 4 * total))
            candidates = self._frame(conn.execute(query))
            plan = assign_rows(candidates, free, order)
            chosen = []
            for backend, indices in plan.items():
                for index in indices:
                    token = new_token()
                    taken = conn.execute(
                        sa.update(t)
                        .where(t.c.idx == _plain(index), claimable)
                        .values(
                            owner=self.worker_id,
                            lease_until=now + self.lease_seconds,
                            planned_backend=backend,
                            create_token=token,
                        )
                    ).rowcount
                    if not taken:  # changed since it was read (e.g. reset by hand): not this sweep's
                        continue
                    candidates.at[index, "create_token"] = token
                    chosen.append((index, backend))
        if not chosen:
            return candidates.iloc[0:0]
        out = candidates.loc[[i for i, _ in chosen]].copy()
        out["planned_backend"] = [b for _, b in chosen]
        return out

    @property
    def claimant_window(self) -> float:
        """A worker that has not claimed rows for this long (seconds) no longer counts for fair shares: two
        of the longest gaps between a worker's sweeps."""
        return 2 * settings.max_sweep_gap

    def _note_claimant(self, conn: sa.Connection, claimants: Mapping[str, float], now: float) -> int:
        """Record (under the table lock) that this worker claims rows now; the number of workers that did
        within ``claimant_window`` seconds, this one included. Recorded again only when the record ages."""
        window = self.claimant_window
        live = {w: float(at) for w, at in claimants.items() if now - float(at) <= window}
        if now - live.get(self.worker_id, -math.inf) > window / 4:
            live[self.worker_id] = now
            self._put_meta(conn, CLAIMANTS, live)
        return len(live)

    def _put_meta(self, conn: sa.Connection, key: str, value: Any) -> None:
        """Write one meta value that no cached meta holds (the cache stays valid)."""
        conn.execute(sa.delete(self.meta).where(self.meta.c.key == key))
        conn.execute(sa.insert(self.meta).values(key=key, value=json.dumps(value)))

    def unclaim(self, indices: Iterable[Any], held: pd.DataFrame | None = None) -> None:
        """Give back claimed ``not_started`` rows whose creation this worker did not begin after all."""
        t = self.table
        indices = [_plain(i) for i in indices]
        with self._tx(table_lock=False) as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.idx.in_(indices), t.c.owner == self.worker_id, t.c.status.in_(PENDING))
                .values(owner=None, lease_until=None, planned_backend=None, create_token=None)
            )

    def claim_downloads(self, limit: int, exclude: Iterable[Any] = (), backends: Iterable[str] = ()) -> pd.DataFrame:
        """Up to ``limit`` finished rows (of ``backends``) whose results are ``pending`` and that no other live
        worker holds, claimed for this worker to download (``exclude``: rows it is busy with already)."""
        self._ready()
        if limit <= 0:
            return self._select(sa.false())
        now = time.time()
        t = self.table
        owed = self._owed(backends)
        excluded = [_plain(i) for i in exclude]
        with self._tx(table_lock=False) as conn:
            # no ORDER BY: the (status, results) index finds the few owed rows among many finished ones
            takeable = self._takeable(conn, now)
            query = sa.select(t.c.idx).where(owed, takeable).limit(limit)
            if excluded:
                query = query.where(t.c.idx.not_in(excluded))
            candidates = list(conn.execute(query).scalars())
            chosen = []
            if candidates:  # taken only where still takeable: another worker may have taken some meanwhile
                chosen = list(
                    conn.execute(
                        sa.update(t)
                        .where(t.c.idx.in_(candidates), owed, takeable)
                        .values(owner=self.worker_id, lease_until=now + self.lease_seconds)
                        .returning(t.c.idx)
                    ).scalars()
                )
        return self._select(t.c.idx.in_(chosen)) if chosen else self._select(sa.false())

    def pending_downloads(self, backends: Iterable[str] = ()) -> int:
        """Finished rows (of ``backends``) whose results are still owed, whoever holds them."""
        self._ready()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(self._owed(backends))).scalar_one())

    def waiting_rows(self) -> dict[str, int]:
        """``not_started`` rows not claimed yet, by the backend they are pinned to (``""``: none)."""
        self._ready()
        t = self.table
        name = sa.func.coalesce(t.c.backend_name, "")
        query = (
            sa.select(name, sa.func.count()).where(t.c.status.in_(PENDING), t.c.create_token.is_(None)).group_by(name)
        )
        with self.engine.connect() as conn:
            return {str(k): int(n) for k, n in conn.execute(query)}

    def count_results(self) -> dict[str, int]:
        """Finished rows by the state of their result download (``results``; blank: ``""``)."""
        self._ready()
        t = self.table
        results = sa.func.coalesce(t.c.results, "")
        query = sa.select(results, sa.func.count()).where(t.c.status == "finished").group_by(results)
        with self.engine.connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(query)}

    def work_left(self, statuses: list[str], backends: Iterable[str]) -> int:
        """Rows with one of ``statuses`` that a worker with ``backends`` may work on: on one of those, or on
        none yet (rows on other backends are for the workers that have them)."""
        self._ready()
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(self.table.c.status.in_(statuses), self._on(backends))
            return int(conn.execute(query).scalar_one())

    def _on(self, backends: Iterable[str]) -> Any:
        """Rows on one of ``backends``, or on no backend yet."""
        name = self.table.c.backend_name
        return sa.or_(name.in_(list(backends)), name.is_(None), name == "")

    def _owed(self, backends: Iterable[str]) -> Any:
        t = self.table
        owed = sa.and_(t.c.status == "finished", t.c.results == "pending")
        backends = list(backends)
        return sa.and_(owed, t.c.backend_name.in_(backends)) if backends else owed

    def held_by_run(self, run: str, statuses: Iterable[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` that a worker whose run is named ``run`` (e.g. a flow run's id) holds or
        was the last to hold."""
        t = self.table
        run = run.replace("|", "_")[:60]  # as recorded (prefect_openeo.jobdb.owners)
        return self._select(sa.and_(t.c.status.in_(list(statuses)), t.c.owner.like(f"%|{run}")))

    def unknown_backends(self, statuses: list[str], known: list[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` naming a backend not in ``known`` that no other live worker holds
        (at most 10): nobody tracks them. Those another worker holds are that worker's (e.g. a worker per
        backend on one database)."""
        self._ready()
        t = self.table
        where = sa.and_(t.c.status.in_(statuses), t.c.backend_name.is_not(None), t.c.backend_name.not_in(known))
        with self.engine.connect() as conn:
            untended = self._takeable(conn, time.time())
        return self._select(sa.and_(where, untended), limit=10)

    def release(self, keep: Iterable[Any] = ()) -> None:
        """Give up this worker's claims (at the end of a run) but those of rows in ``keep``, so others need not
        wait for leases. The lease ends; ``owner`` stays as the row's last holder until another worker takes
        it (``held_by_run``: a canceled flow run cancels the jobs it was tracking)."""
        t = self.table
        mine = t.c.owner == self.worker_id
        kept = [_plain(i) for i in keep]
        with self._tx(table_lock=False) as conn:
            where = sa.and_(mine, t.c.idx.not_in(kept)) if kept else mine
            conn.execute(sa.update(t).where(where).values(lease_until=0.0))
        with self._tx() as conn:  # its share of the slots goes to the others now
            claimants = dict(self._read_meta(conn).get(CLAIMANTS) or {})
            if claimants.pop(self.worker_id, None) is not None:
                self._put_meta(conn, CLAIMANTS, claimants)

    def drop(self) -> None:
        """Delete the table and its meta table (tests, tooling)."""
        self._md.drop_all(self.engine)
        self._meta_cache = None
        self._schema_checked = False


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin), so transactions cover DDL and take the write lock
    # up front when asked: the driver's own implicit transactions would do neither.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")
