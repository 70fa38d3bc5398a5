//! Opening the database file: recognising it as ours, migrating its schema, and the pragmas that
//! make a committed write survive `kill -9` (WAL, `synchronous = FULL`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::StoreError;

/// `PRAGMA application_id` of an Outpost store ("OPST"); anything else is someone else's file.
pub const APPLICATION_ID: i64 = 0x4F50_5354;

/// Schema migrations, in order; `PRAGMA user_version` counts how many have run. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: KV, CRDT objects and their delta journal, replication log, metadata.
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value ANY
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE kv (
        ns TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB,
        content_type TEXT,
        expires_ms INTEGER,
        stamp BLOB NOT NULL,
        stamp_ms INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        PRIMARY KEY (ns, key)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX kv_expiry ON kv (expires_ms) WHERE expires_ms IS NOT NULL;
    CREATE INDEX kv_tombstones ON kv (stamp_ms) WHERE value IS NULL;
    CREATE INDEX kv_bucket ON kv (bucket);
    CREATE TABLE crdt (
        name TEXT PRIMARY KEY,
        state BLOB NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE crdt_delta (
        seq INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        delta BLOB NOT NULL
    ) STRICT;
    CREATE INDEX crdt_delta_name ON crdt_delta (name);
    CREATE TABLE replication_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        change BLOB NOT NULL
    ) STRICT;",
    // 2: the outbox (writes kept until the center takes them).
    "CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        route TEXT NOT NULL,
        order_key TEXT NOT NULL,
        method TEXT NOT NULL,
        uri TEXT NOT NULL,
        headers BLOB NOT NULL,
        body BLOB NOT NULL,
        idempotency_key TEXT NOT NULL,
        identity TEXT,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        last_error TEXT,
        response BLOB
    ) STRICT;
    CREATE INDEX outbox_queue ON outbox (state, order_key, seq);",
    // 3: the URL the client wrote to, so a delivered write can invalidate the edge's copy.
    "ALTER TABLE outbox ADD COLUMN client_host TEXT;
    ALTER TABLE outbox ADD COLUMN client_target TEXT;",
];

/// One kind of Outpost database file: how to recognise it, migrate it and how hard to sync.
#[derive(Debug, Clone, Copy)]
pub struct FileKind {
    /// `PRAGMA application_id`; anything else is someone else's file.
    pub application_id: i64,
    /// Append-only migrations; `PRAGMA user_version` counts how many have run.
    pub migrations: &'static [&'static str],
    /// `PRAGMA synchronous`: `FULL` where an answer promises durability, `NORMAL` elsewhere.
    pub synchronous: &'static str,
    /// What the file is, for logs.
    pub what: &'static str,
}

/// The node's store (`outpost.db`): KV, CRDTs, replication log, outbox.
pub const STORE: FileKind = FileKind {
    application_id: APPLICATION_ID,
    migrations: MIGRATIONS,
    // FULL: every commit is fsync'd before the caller hears "stored" (the outbox promises it).
    synchronous: "FULL",
    what: "Local store",
};

/// Opens (creating if needed) the store file for writing, checks it is ours, runs migrations.
pub fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    open_file(path, &STORE)
}

/// Opens (creating if needed) a database file of `kind` for writing: a non-database, a
/// foreign or a damaged file, or one with a newer schema, is refused with what to do; then WAL,
/// the kind's `synchronous`, and its migrations.
pub fn open_file(path: &Path, kind: &FileKind) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| corrupt(path, &e))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // The first statement that touches the file tells a non-database apart.
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| corrupt(path, &e))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(|e| corrupt(path, &e))?;
    if app_id != kind.application_id && (app_id != 0 || tables > 0) {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            found: app_id,
        });
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| corrupt(path, &e))?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("integrity check: {check}"),
        });
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", kind.synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&conn, path, kind)?;
    Ok(conn)
}

/// Opens a read-only connection for point reads beside the writer (WAL lets them run together).
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| corrupt(path, &e))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path, kind: &FileKind) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = kind.migrations.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for (i, sql) in kind.migrations.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "application_id", kind.application_id)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(path = %path.display(), version = i + 1, "{} schema migrated.", kind.what);
    }
    Ok(())
}

fn corrupt(path: &Path, e: &rusqlite::Error) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_created_and_marked_as_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.db");
        let conn = open_writer(&path).expect("open");
        let id: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .expect("id");
        assert_eq!(id, APPLICATION_ID);
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("v");
        assert_eq!(v, MIGRATIONS.len() as i64);
        drop(conn);
        // Reopening runs no migration and succeeds.
        open_writer(&path).expect("reopen");
    }

    #[test]
    fn a_text_file_is_reported_as_not_a_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.db");
        std::fs::write(&path, b"this is not sqlite, just some bytes that fill a header page ....................................................")
            .expect("write");
        let err = open_writer(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");
    }

    #[test]
    fn another_applications_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.db");
        let other = Connection::open(&path).expect("open");
        other
            .execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);")
            .expect("create");
        drop(other);
        let err = open_writer(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains("not an Outpost store"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.db");
        let conn = open_writer(&path).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        drop(conn);
        let err = open_writer(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn a_damaged_page_is_caught_by_the_integrity_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.db");
        let conn = open_writer(&path).expect("open");
        conn.pragma_update(None, "journal_mode", "DELETE")
            .expect("no wal");
        {
            let mut stmt = conn
                .prepare("INSERT INTO kv (ns, key, value, stamp, stamp_ms, bucket) VALUES ('n', ?1, zeroblob(900), x'00', 0, 0)")
                .expect("prep");
            for i in 0..200 {
                stmt.execute([format!("key-{i:04}")]).expect("insert");
            }
        }
        drop(conn);
        let mut bytes = std::fs::read(&path).expect("read");
        let page = 4096;
        // Scribble over the middle of the file (past the header page), where b-tree pages live.
        let start = page * 3;
        for b in &mut bytes[start..start + page] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).expect("write");
        let err = open_writer(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
