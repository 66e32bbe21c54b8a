//! Storage: one type over SQLite (embedded, one file, single replica) and
//! PostgreSQL (several replicas, one database). Queries are runtime-checked
//! portable SQL with `$N` placeholders (both drivers accept them), so each
//! method is written once and expanded for both pools by [`with_pool!`].
//!
//! Leader election: SQLite is always leader. On PostgreSQL a replica is
//! leader while it holds a session-level advisory lock on a dedicated
//! connection ([`LeaderLock`]); the lock dies with the connection, so a
//! killed replica hands leadership over as soon as PostgreSQL notices.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use sqlx::{Connection, Row};

/// Key of the leader advisory lock ("ridge" in ASCII).
pub const LEADER_LOCK_KEY: i64 = 0x7269_6467_6501;
/// Key of the migration advisory lock.
const MIGRATION_LOCK_KEY: i64 = 0x7269_6467_6502;

/// Migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "init", include_str!("../migrations/0001_init.sql"))];

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot open database: {0}")]
    Open(String),
}

/// Why an enrollment was refused by the token checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    Unknown,
    Expired { at: u64 },
    Revoked,
    Exhausted { uses: u32, max: u32 },
}

/// A bootstrap token row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub secret_hash: String,
    pub region: String,
    pub labels: String,
    pub description: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub max_uses: u32,
    pub uses: u32,
    pub revoked_at: Option<u64>,
}

/// A node row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub token_id: String,
    pub key_alg: String,
    pub public_key: String,
    pub region: String,
    pub labels: String,
    pub hostname: String,
    pub agent_version: String,
    pub dataplane_secret: String,
    pub enrolled_at: u64,
    pub drain: bool,
    pub last_heartbeat_ms: Option<u64>,
    pub report: Option<String>,
    pub desired_version: u64,
    pub desired: Option<String>,
}

/// A pending heartbeat to persist.
#[derive(Debug, Clone)]
pub struct HeartbeatWrite {
    pub id: String,
    pub at_ms: u64,
    pub report: String,
}

/// The columns of a node row that change after enrollment, which a
/// snapshot reload reads for every node (see `Store::load_node_heads`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHead {
    pub id: String,
    pub drain: bool,
    pub last_heartbeat_ms: Option<u64>,
    pub desired_version: u64,
}

/// Rows per statement when reading or writing many nodes at once: well
/// under SQLite's 32,766 and PostgreSQL's 65,535 bind parameters.
const BATCH_ROWS: usize = 500;

/// `$first, $first+1, …` for `n` parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|k| format!("${k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The database.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

macro_rules! with_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match $self {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const TOKEN_COLS: &str = "id, secret_hash, region, labels, description, created_at, expires_at, max_uses, uses, revoked_at";
const NODE_COLS: &str = "id, token_id, key_alg, public_key, region, labels, hostname, agent_version, \
     dataplane_secret, enrolled_at, drain, last_heartbeat_ms, report, desired_version, desired";

fn token_row<R: Row>(r: &R) -> Result<TokenRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database>,
{
    Ok(TokenRow {
        id: r.try_get("id")?,
        secret_hash: r.try_get("secret_hash")?,
        region: r.try_get("region")?,
        labels: r.try_get("labels")?,
        description: r.try_get("description")?,
        created_at: u(r.try_get("created_at")?),
        expires_at: u(r.try_get("expires_at")?),
        max_uses: u32::try_from(r.try_get::<i64, _>("max_uses")?).unwrap_or(0),
        uses: u32::try_from(r.try_get::<i64, _>("uses")?).unwrap_or(u32::MAX),
        revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(u),
    })
}

fn node_row<R: Row>(r: &R) -> Result<NodeRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database>,
{
    Ok(NodeRow {
        id: r.try_get("id")?,
        token_id: r.try_get("token_id")?,
        key_alg: r.try_get("key_alg")?,
        public_key: r.try_get("public_key")?,
        region: r.try_get("region")?,
        labels: r.try_get("labels")?,
        hostname: r.try_get("hostname")?,
        agent_version: r.try_get("agent_version")?,
        dataplane_secret: r.try_get("dataplane_secret")?,
        enrolled_at: u(r.try_get("enrolled_at")?),
        drain: r.try_get::<i64, _>("drain")? != 0,
        last_heartbeat_ms: r.try_get::<Option<i64>, _>("last_heartbeat_ms")?.map(u),
        report: r.try_get("report")?,
        desired_version: u(r.try_get("desired_version")?),
        desired: r.try_get("desired")?,
    })
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() || path.contains(":memory:") {
                return Err(StoreError::Open(
                    "give SQLite a file path (an in-memory database would lose everything)".into(),
                ));
            }
            prepare_sqlite_files(Path::new(path))?;
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
                .map_err(|e| StoreError::Open(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let pool = PoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await?;
            // WAL mode has created -wal and -shm by now (SQLite gives them
            // the database file's mode); check them too.
            for f in sqlite_files(Path::new(path)) {
                tighten(&f, 0o600)?;
            }
            Self::Sqlite(pool)
        } else {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|_| StoreError::Open("malformed PostgreSQL URL".into()))?;
            let pool = PoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Self::Postgres(pool)
        };
        store.migrate().await?;
        Ok(store)
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Applies missing migrations in one transaction each. On PostgreSQL a
    /// transaction-scoped advisory lock serializes replicas starting at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if matches!(self, Store::Postgres(_)) {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .execute(&mut *tx)
            .await?;
            let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("version"))
                .collect::<Result<_, _>>()?;
            for (version, name, sql) in MIGRATIONS {
                if applied.contains(version) {
                    continue;
                }
                sqlx::raw_sql(sql).execute(&mut *tx).await?;
                sqlx::query(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                )
                .bind(*version)
                .bind(*name)
                .bind(i(now_secs()))
                .execute(&mut *tx)
                .await?;
                tracing::info!(version, name, "applied migration");
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The stored setting `key`, created with `init()` on first use. Races
    /// between replicas are settled by the primary key: the first write wins.
    pub async fn setting(
        &self,
        key: &str,
        init: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                .bind(key)
                .bind(init())
                .execute(pool)
                .await?;
            let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<String, _>("value")?)
        })
    }

    /// Inserts a bootstrap token.
    pub async fn insert_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(&format!(
                "INSERT INTO bootstrap_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(&t.id)
            .bind(&t.secret_hash)
            .bind(&t.region)
            .bind(&t.labels)
            .bind(&t.description)
            .bind(i(t.created_at))
            .bind(i(t.expires_at))
            .bind(i64::from(t.max_uses))
            .bind(i64::from(t.uses))
            .bind(t.revoked_at.map(i))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// All tokens, newest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(&format!(
                "SELECT {TOKEN_COLS} FROM bootstrap_tokens ORDER BY created_at DESC, id"
            ))
            .fetch_all(pool)
            .await?;
            Ok(rows.iter().map(token_row).collect::<Result<_, _>>()?)
        })
    }

    /// One token.
    pub async fn get_token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        with_pool!(self, pool => {
            let row = sqlx::query(&format!("SELECT {TOKEN_COLS} FROM bootstrap_tokens WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            Ok(row.as_ref().map(token_row).transpose()?)
        })
    }

    /// Revokes a token (idempotent); `None` if unknown.
    pub async fn revoke_token(&self, id: &str, now: u64) -> Result<Option<TokenRow>, StoreError> {
        with_pool!(self, pool => {
            sqlx::query("UPDATE bootstrap_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(i(now))
                .bind(id)
                .execute(pool)
                .await?;
            Ok::<(), StoreError>(())
        })?;
        self.get_token(id).await
    }

    /// Uses the token once and inserts the node, atomically. The token's
    /// secret must already have been checked. Returns the refusal when the
    /// token is expired, revoked or used up (then nothing changes).
    pub async fn enroll(
        &self,
        node: &NodeRow,
        now: u64,
    ) -> Result<Result<(), EnrollRefusal>, StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let used = sqlx::query(
                "UPDATE bootstrap_tokens SET uses = uses + 1 \
                 WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2 AND uses < max_uses",
            )
            .bind(&node.token_id)
            .bind(i(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if used != 1 {
                let row = sqlx::query(&format!("SELECT {TOKEN_COLS} FROM bootstrap_tokens WHERE id = $1"))
                    .bind(&node.token_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.rollback().await?;
                let refusal = match row.as_ref().map(token_row).transpose()? {
                    None => EnrollRefusal::Unknown,
                    Some(t) if t.revoked_at.is_some() => EnrollRefusal::Revoked,
                    Some(t) if t.expires_at <= now => EnrollRefusal::Expired { at: t.expires_at },
                    Some(t) => EnrollRefusal::Exhausted { uses: t.uses, max: t.max_uses },
                };
                return Ok(Err(refusal));
            }
            sqlx::query(&format!(
                "INSERT INTO nodes ({NODE_COLS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
            ))
            .bind(&node.id)
            .bind(&node.token_id)
            .bind(&node.key_alg)
            .bind(&node.public_key)
            .bind(&node.region)
            .bind(&node.labels)
            .bind(&node.hostname)
            .bind(&node.agent_version)
            .bind(&node.dataplane_secret)
            .bind(i(node.enrolled_at))
            .bind(i64::from(node.drain))
            .bind(node.last_heartbeat_ms.map(i))
            .bind(&node.report)
            .bind(i(node.desired_version))
            .bind(&node.desired)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    /// One node.
    pub async fn get_node(&self, id: &str) -> Result<Option<NodeRow>, StoreError> {
        with_pool!(self, pool => {
            let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            Ok(row.as_ref().map(node_row).transpose()?)
        })
    }

    /// Every node.
    pub async fn load_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))
                .fetch_all(pool)
                .await?;
            Ok(rows.iter().map(node_row).collect::<Result<_, _>>()?)
        })
    }

    /// The changing columns of every node: what a snapshot reload needs to
    /// decide which rows it must read in full ([`Store::load_nodes_by_id`]).
    pub async fn load_node_heads(&self) -> Result<Vec<NodeHead>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, drain, last_heartbeat_ms, desired_version FROM nodes ORDER BY id",
            )
            .fetch_all(pool)
            .await?;
            let mut heads = Vec::with_capacity(rows.len());
            for r in &rows {
                heads.push(NodeHead {
                    id: r.try_get("id")?,
                    drain: r.try_get::<i64, _>("drain")? != 0,
                    last_heartbeat_ms: r.try_get::<Option<i64>, _>("last_heartbeat_ms")?.map(u),
                    desired_version: u(r.try_get("desired_version")?),
                });
            }
            Ok(heads)
        })
    }

    /// The full rows of these nodes (unknown ids are left out), read
    /// [`BATCH_ROWS`] at a time.
    pub async fn load_nodes_by_id(&self, ids: &[String]) -> Result<Vec<NodeRow>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH_ROWS) {
            let sql = format!(
                "SELECT {NODE_COLS} FROM nodes WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            with_pool!(self, pool => {
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id);
                }
                for r in q.fetch_all(pool).await? {
                    out.push(node_row(&r)?);
                }
            });
        }
        Ok(out)
    }

    /// Persists heartbeats in one transaction, [`BATCH_ROWS`] per
    /// statement. A heartbeat never moves `last_heartbeat_ms` backwards
    /// (another replica may have a newer one).
    pub async fn write_heartbeats(&self, batch: &[HeartbeatWrite]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in batch.chunks(BATCH_ROWS) {
                // `VALUES` names its columns column1, column2, … in both
                // SQLite (3.33+, for UPDATE … FROM) and PostgreSQL.
                let rows = (0..chunk.len())
                    .map(|k| format!("({})", placeholders(3 * k + 1, 3)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "UPDATE nodes SET last_heartbeat_ms = v.column2, report = v.column3 \
                     FROM (VALUES {rows}) AS v \
                     WHERE nodes.id = v.column1 \
                     AND (nodes.last_heartbeat_ms IS NULL OR nodes.last_heartbeat_ms <= v.column2)"
                );
                let mut q = sqlx::query(&sql);
                for hb in chunk {
                    q = q.bind(&hb.id).bind(i(hb.at_ms)).bind(&hb.report);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Sets or clears a node's drain flag; `false` if the node is unknown.
    pub async fn set_drain(&self, id: &str, drain: bool) -> Result<bool, StoreError> {
        with_pool!(self, pool => {
            let n = sqlx::query("UPDATE nodes SET drain = $1 WHERE id = $2")
                .bind(i64::from(drain))
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected();
            Ok(n == 1)
        })
    }

    /// Writes new desired states (id, version, JSON) in one transaction.
    pub async fn write_desired(&self, batch: &[(String, u64, String)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for (id, version, body) in batch {
                sqlx::query("UPDATE nodes SET desired_version = $1, desired = $2 WHERE id = $3")
                    .bind(i(*version))
                    .bind(body)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Desired states with a version above `seq`.
    pub async fn desired_since(&self, seq: u64) -> Result<Vec<(String, u64, String)>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, desired_version, desired FROM nodes \
                 WHERE desired_version > $1 AND desired IS NOT NULL",
            )
            .bind(i(seq))
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String, _>("id")?,
                        u(r.try_get::<i64, _>("desired_version")?),
                        r.try_get::<String, _>("desired")?,
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Stores the leader's route plan.
    pub async fn save_plan(&self, at_ms: u64, leader: &str, plan: &str) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO route_plan (id, computed_at_ms, leader, plan) VALUES (1, $1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET computed_at_ms = excluded.computed_at_ms, \
                 leader = excluded.leader, plan = excluded.plan",
            )
            .bind(i(at_ms))
            .bind(leader)
            .bind(plan)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// The last stored route plan: (computed_at_ms, leader, plan JSON).
    pub async fn load_plan(&self) -> Result<Option<(u64, String, String)>, StoreError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT computed_at_ms, leader, plan FROM route_plan WHERE id = 1")
                .fetch_optional(pool)
                .await?;
            row.map(|r| {
                Ok((
                    u(r.try_get::<i64, _>("computed_at_ms")?),
                    r.try_get::<String, _>("leader")?,
                    r.try_get::<String, _>("plan")?,
                ))
            })
            .transpose()
            .map_err(|e: sqlx::Error| StoreError::from(e))
        })
    }

    /// Whether the database answers (a `SELECT 1`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
            Ok(())
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

/// The SQLite database and its `-wal` and `-shm` files.
fn sqlite_files(db: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    [db.to_owned(), with("-wal"), with("-shm")]
}

/// Sets `path`'s mode to `mode` if it grants more, with a warning; a
/// missing file is fine.
fn tighten(path: &Path, mode: u32) -> Result<(), StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Open(format!("{}: {e}", path.display()))),
    };
    let found = meta.permissions().mode() & 0o777;
    if found & !mode != 0 {
        tracing::warn!(
            path = %path.display(),
            found = format!("{found:o}"),
            now = format!("{mode:o}"),
            "the database holds the signing and mesh keys and every node's dataplane secret: \
             it was readable or writable by others; tightening its mode"
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| StoreError::Open(format!("chmod {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Before SQLite opens `db`: creates its directory 0700 if missing, warns
/// if an existing one lets others in (it may be shared, e.g. the working
/// directory, so it is left as it is), creates the file 0600 whatever the
/// umask, and tightens existing files to 0600.
fn prepare_sqlite_files(db: &Path) -> Result<(), StoreError> {
    let open_err = |p: &Path, e: std::io::Error| StoreError::Open(format!("{}: {e}", p.display()));
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o022 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    mode = format!("{mode:o}"),
                    "the database directory is writable by others: they could replace or \
                     remove the database; give it mode 0700"
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| open_err(&dir, e))?;
            // The umask may have narrowed 0700 further, never widened it;
            // set it exactly.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| open_err(&dir, e))?;
        }
        Err(e) => return Err(open_err(&dir, e)),
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(db)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(open_err(db, e)),
    }
    for f in sqlite_files(db) {
        tighten(&f, 0o600)?;
    }
    Ok(())
}

/// Leadership on PostgreSQL: a dedicated connection holding
/// `pg_try_advisory_lock(LEADER_LOCK_KEY)`.
#[derive(Debug, Default)]
pub struct LeaderLock {
    conn: Option<PgConnection>,
}

impl LeaderLock {
    /// Tries to become or stay leader. SQLite: always `true`. PostgreSQL:
    /// checks the held connection still answers; otherwise opens one and
    /// tries the lock. Errors count as "not leader".
    pub async fn ensure(&mut self, store: &Store, url: &str) -> bool {
        if matches!(store, Store::Sqlite(_)) {
            return true;
        }
        if let Some(conn) = self.conn.as_mut() {
            let alive = tokio::time::timeout(Duration::from_secs(2), conn.ping()).await;
            if matches!(alive, Ok(Ok(()))) {
                return true;
            }
            tracing::warn!("leader lock connection lost; giving up leadership");
            self.conn = None;
        }
        let attempt = async {
            let opts = PgConnectOptions::from_str(url)?;
            let mut conn = PgConnection::connect_with(&opts).await?;
            let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
                .bind(LEADER_LOCK_KEY)
                .fetch_one(&mut conn)
                .await?
                .try_get("got")?;
            Ok::<_, sqlx::Error>(got.then_some(conn))
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(Some(conn))) => {
                self.conn = Some(conn);
                true
            }
            Ok(Ok(None)) => false,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election failed");
                false
            }
            Err(_) => false,
        }
    }

    /// Releases leadership (closing the connection drops the lock).
    pub async fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
