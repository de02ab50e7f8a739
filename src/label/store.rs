//! The labeling store: one SQLite file (WAL, `synchronous=FULL`, so a label is on disk
//! before its submission is acknowledged, even if the server is killed right after).
//! The schema is versioned with `PRAGMA user_version`; `Store::open` applies the
//! migrations a file lacks, in order, each in its own transaction. Every statement is
//! parameterised.
//!
//! Tables: `project` (one row: kind, K, overlap, guidelines, models, settings),
//! `labelers` (name, SHA-256 of the token, admin flag), `items` (prompt, original row,
//! queue priority), `responses` (K per item), `assignments` (which labeler was given
//! which item: at most one row per pair, so an item is never given twice to one
//! labeler) and `labels` (every submission: labeler, time, seconds spent, the
//! client-generated id that makes a retried submission land once, and `undone_at`
//! for an undone one, kept for the record).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use super::error::{LabelError, Result};

/// The schema, one migration per version: `MIGRATIONS[v]` takes a file from version
/// `v` to `v + 1`. Append only; never edit a released migration.
const MIGRATIONS: &[&str] = &[
    // 1: the tables.
    "CREATE TABLE project (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        kind TEXT NOT NULL,
        k INTEGER NOT NULL,
        overlap INTEGER NOT NULL,
        guidelines TEXT NOT NULL,
        models TEXT NOT NULL,
        settings TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE labelers (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        is_admin INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        position INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        source TEXT NOT NULL,
        priority REAL
    );
    CREATE TABLE responses (
        item_id INTEGER NOT NULL REFERENCES items(id),
        idx INTEGER NOT NULL,
        text TEXT NOT NULL,
        model TEXT NOT NULL,
        PRIMARY KEY (item_id, idx)
    );
    CREATE TABLE assignments (
        item_id INTEGER NOT NULL REFERENCES items(id),
        labeler_id INTEGER NOT NULL REFERENCES labelers(id),
        assigned_at REAL NOT NULL,
        released INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (item_id, labeler_id)
    );
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        client_id TEXT NOT NULL UNIQUE,
        item_id INTEGER NOT NULL REFERENCES items(id),
        labeler_id INTEGER NOT NULL REFERENCES labelers(id),
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        seconds REAL NOT NULL,
        undone_at TEXT
    );
    CREATE UNIQUE INDEX one_live_label ON labels(item_id, labeler_id) WHERE undone_at IS NULL;",
    // 2: a labeler's history (progress, undo) without a scan.
    "CREATE INDEX labels_by_labeler ON labels(labeler_id, id);
     CREATE INDEX assignments_by_labeler ON assignments(labeler_id, assigned_at);",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// What a project asks of its labelers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Rank K responses per prompt (ties allowed), score each 1–7, flag problems.
    Rank,
    /// Write the response a model should have given.
    Demonstrate,
    /// Two models' responses side by side, blind: left, right, tie or both bad.
    Compare,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rank => "rank",
            Kind::Demonstrate => "demonstrate",
            Kind::Compare => "compare",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "rank" => Ok(Kind::Rank),
            "demonstrate" => Ok(Kind::Demonstrate),
            "compare" => Ok(Kind::Compare),
            other => Err(LabelError::Corrupt(format!(
                "unknown project kind {other:?}"
            ))),
        }
    }
}

/// The project a store holds (one per file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub kind: Kind,
    /// Responses per item (rank: K; compare: 2; demonstrate: 0).
    pub k: usize,
    /// How many different labelers each item goes to.
    pub overlap: usize,
    /// Markdown shown on every page.
    pub guidelines: String,
    /// The model behind each response index (compare: [A, B]).
    pub models: Vec<String>,
    /// Sampling settings and the random salt of the per-labeler orders.
    pub settings: Value,
}

/// An item to insert: the prompt (a string or a list of messages), the row it came
/// from, and its responses (text, model).
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    pub prompt: Value,
    pub source: Value,
    pub responses: Vec<(String, String)>,
}

/// A labeler as the server sees one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Labeler {
    pub id: i64,
    pub name: String,
    pub is_admin: bool,
}

/// An item with its responses in stored order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub id: i64,
    pub position: i64,
    pub prompt: Value,
    pub responses: Vec<String>,
}

/// A live (not undone) label, as export and the admin page read them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelRow {
    pub id: i64,
    pub client_id: String,
    pub item_id: i64,
    pub labeler: String,
    pub kind: String,
    pub payload: Value,
    pub created_at: String,
    pub seconds: f64,
}

/// A label to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLabel {
    pub client_id: String,
    pub item_id: i64,
    /// `rank`, `demonstrate`, `compare` or `skip`.
    pub kind: &'static str,
    pub payload: Value,
    pub seconds: f64,
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stored {
    pub label_id: i64,
    /// The client id was already stored: this is a retry, nothing new was written.
    pub duplicate: bool,
}

pub struct Store {
    pub(super) conn: Connection,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn json_col(text: String, what: &str) -> Result<Value> {
    serde_json::from_str(&text).map_err(|e| LabelError::Corrupt(format!("{what}: {e}")))
}

impl Store {
    /// Opens (creating it if needed) a store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|e| LabelError::db(path, e))?;
        let mut store = Store { conn };
        store.configure().map_err(|e| LabelError::db(path, e))?;
        store.migrate(path)?;
        Ok(store)
    }

    /// Opens an existing store; a missing file is an error, not a new empty store.
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(LabelError::Invalid(format!(
                "{}: no such labeling database (create one with `rlhf label new`)",
                path.display()
            )));
        }
        Self::open(path)
    }

    fn configure(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(std::time::Duration::from_secs(10))?;
        self.conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<usize> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok(v as usize)
    }

    fn migrate(&mut self, path: &Path) -> Result<()> {
        let have = self.schema_version()?;
        if have > SCHEMA_VERSION {
            return Err(LabelError::Invalid(format!(
                "{}: schema version {have} is newer than this rlhf's ({SCHEMA_VERSION}); use a newer rlhf",
                path.display()
            )));
        }
        for (v, sql) in MIGRATIONS.iter().enumerate().skip(have) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            // PRAGMA takes no parameters; the value is our own integer.
            tx.execute_batch(&format!("PRAGMA user_version = {}", v + 1))?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The project, or an error if `label new` has not made one.
    pub fn project(&self) -> Result<Project> {
        let row = self
            .conn
            .query_row(
                "SELECT kind, k, overlap, guidelines, models, settings FROM project WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((kind, k, overlap, guidelines, models, settings)) = row else {
            return Err(LabelError::Invalid(
                "the database holds no project (create one with `rlhf label new`)".into(),
            ));
        };
        Ok(Project {
            kind: Kind::parse(&kind)?,
            k: k as usize,
            overlap: overlap as usize,
            guidelines,
            models: serde_json::from_value(json_col(models, "project.models")?)
                .map_err(|e| LabelError::Corrupt(format!("project.models: {e}")))?,
            settings: json_col(settings, "project.settings")?,
        })
    }

    /// Writes the project and its items in one transaction; a store that already
    /// holds a project is refused.
    pub fn create_project(&mut self, project: &Project, items: &[NewItem]) -> Result<()> {
        let tx = self.conn.transaction()?;
        let exists: i64 = tx.query_row("SELECT COUNT(*) FROM project", [], |r| r.get(0))?;
        if exists > 0 {
            return Err(LabelError::Invalid(
                "the database already holds a project; give a new --db".into(),
            ));
        }
        tx.execute(
            "INSERT INTO project (id, kind, k, overlap, guidelines, models, settings, created_at)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                project.kind.name(),
                project.k as i64,
                project.overlap as i64,
                project.guidelines,
                serde_json::to_string(&project.models).expect("strings serialize"),
                project.settings.to_string(),
                now_rfc3339(),
            ],
        )?;
        for (position, item) in items.iter().enumerate() {
            tx.execute(
                "INSERT INTO items (position, prompt, source) VALUES (?1, ?2, ?3)",
                params![
                    position as i64,
                    item.prompt.to_string(),
                    item.source.to_string()
                ],
            )?;
            let id = tx.last_insert_rowid();
            for (idx, (text, model)) in item.responses.iter().enumerate() {
                tx.execute(
                    "INSERT INTO responses (item_id, idx, text, model) VALUES (?1, ?2, ?3, ?4)",
                    params![id, idx as i64, text, model],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds a labeler with a fresh token; returns the token (only its hash is kept).
    pub fn add_labeler(&mut self, name: &str, is_admin: bool) -> Result<String> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(LabelError::Invalid(format!(
                "labeler name {name:?} must be 1 to 64 printable characters"
            )));
        }
        let token = crate::web::new_token();
        let inserted = self.conn.execute(
            "INSERT INTO labelers (name, token_hash, is_admin, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO NOTHING",
            params![
                name,
                crate::web::token_hash(&token),
                is_admin,
                now_rfc3339()
            ],
        )?;
        if inserted == 0 {
            return Err(LabelError::Invalid(format!(
                "a labeler named {name:?} already exists"
            )));
        }
        Ok(token)
    }

    /// The labeler a token belongs to.
    pub fn labeler_by_token(&self, token: &str) -> Result<Option<Labeler>> {
        let hash = crate::web::token_hash(token);
        let found = self
            .conn
            .query_row(
                "SELECT id, name, is_admin, token_hash FROM labelers WHERE token_hash = ?1",
                params![hash],
                |r| {
                    Ok((
                        Labeler {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            is_admin: r.get(2)?,
                        },
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?;
        Ok(found
            .filter(|(_, h)| crate::web::auth::tokens_equal(h, &hash))
            .map(|(l, _)| l))
    }

    /// Every labeler, in creation order.
    pub fn labelers(&self) -> Result<Vec<Labeler>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, is_admin FROM labelers ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(Labeler {
                id: r.get(0)?,
                name: r.get(1)?,
                is_admin: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One item with its responses.
    pub fn item(&self, id: i64) -> Result<Item> {
        let (position, prompt) = self
            .conn
            .query_row(
                "SELECT position, prompt FROM items WHERE id = ?1",
                params![id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
            .ok_or_else(|| LabelError::NotFound(format!("no item {id}")))?;
        let mut st = self
            .conn
            .prepare("SELECT text FROM responses WHERE item_id = ?1 ORDER BY idx")?;
        let responses = st
            .query_map(params![id], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Item {
            id,
            position,
            prompt: json_col(prompt, "items.prompt")?,
            responses,
        })
    }

    /// Every item, in file order.
    pub fn items(&self) -> Result<Vec<Item>> {
        let ids: Vec<i64> = {
            let mut st = self
                .conn
                .prepare("SELECT id FROM items ORDER BY position")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        ids.into_iter().map(|id| self.item(id)).collect()
    }

    /// Sets the queue priorities (lower first); `None` clears them (file order).
    pub fn set_priorities(&mut self, priorities: &[(i64, Option<f64>)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (id, p) in priorities {
            tx.execute(
                "UPDATE items SET priority = ?2 WHERE id = ?1",
                params![id, p],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores a label from `labeler` for an item assigned to them, whatever the age
    /// of their hold (`submit_within`, in `assign`, checks the lease). A client id
    /// seen before from the same labeler with the same item and answer is a retry:
    /// the stored label is returned and nothing is written; with another item or
    /// answer it is refused.
    pub fn submit(&mut self, labeler: &Labeler, label: &NewLabel) -> Result<Stored> {
        self.submit_checked(labeler, label, &|_, _, _| Ok(true))
    }

    /// `submit`, with `hold_ok(conn, item, labeler)` deciding whether the labeler's
    /// unanswered hold on the item still entitles them to answer it.
    pub(super) fn submit_checked(
        &mut self,
        labeler: &Labeler,
        label: &NewLabel,
        hold_ok: &dyn Fn(&rusqlite::Connection, i64, i64) -> Result<bool>,
    ) -> Result<Stored> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seen = tx
            .query_row(
                "SELECT id, labeler_id, item_id, kind, payload FROM labels WHERE client_id = ?1",
                params![label.client_id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?;
        if let Some((id, owner, item, kind, payload)) = seen {
            if owner != labeler.id {
                return Err(LabelError::Conflict(format!(
                    "client_id {:?} was already used by another labeler",
                    label.client_id
                )));
            }
            let same_answer =
                serde_json::from_str::<Value>(&payload).ok().as_ref() == Some(&label.payload);
            if item != label.item_id || kind != label.kind || !same_answer {
                return Err(LabelError::Conflict(format!(
                    "client_id {:?} was already used for a different submission; \
                     a changed answer needs a new client_id",
                    label.client_id
                )));
            }
            return Ok(Stored {
                label_id: id,
                duplicate: true,
            });
        }
        let assigned: Option<bool> = tx
            .query_row(
                "SELECT released FROM assignments WHERE item_id = ?1 AND labeler_id = ?2",
                params![label.item_id, labeler.id],
                |r| r.get(0),
            )
            .optional()?;
        match assigned {
            None => {
                return Err(LabelError::Conflict(format!(
                    "item {} is not assigned to you (ask /api/next for your next item)",
                    label.item_id
                )))
            }
            Some(true) => {
                return Err(LabelError::Conflict(format!(
                    "item {} was given to another labeler after your assignment expired",
                    label.item_id
                )))
            }
            Some(false) => {
                if !hold_ok(&tx, label.item_id, labeler.id)? {
                    return Err(LabelError::Conflict(format!(
                        "your hold on item {} expired and another labeler took its slot",
                        label.item_id
                    )));
                }
            }
        }
        let live: i64 = tx.query_row(
            "SELECT COUNT(*) FROM labels WHERE item_id = ?1 AND labeler_id = ?2 AND undone_at IS NULL",
            params![label.item_id, labeler.id],
            |r| r.get(0),
        )?;
        if live > 0 {
            return Err(LabelError::Conflict(format!(
                "you already labeled item {}; undo that label first to change it",
                label.item_id
            )));
        }
        tx.execute(
            "INSERT INTO labels (client_id, item_id, labeler_id, kind, payload, created_at, seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                label.client_id,
                label.item_id,
                labeler.id,
                label.kind,
                label.payload.to_string(),
                now_rfc3339(),
                label.seconds,
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Stored {
            label_id: id,
            duplicate: false,
        })
    }

    /// Undoes the labeler's most recent live label: it is kept with `undone_at` set,
    /// and its item is given back to the labeler as their next one. Returns the item.
    pub fn undo_last(&mut self, labeler: &Labeler) -> Result<i64> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last = tx
            .query_row(
                "SELECT id, item_id FROM labels WHERE labeler_id = ?1 AND undone_at IS NULL
                 ORDER BY id DESC LIMIT 1",
                params![labeler.id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        let Some((id, item)) = last else {
            return Err(LabelError::Conflict(
                "there is no submission to undo".into(),
            ));
        };
        tx.execute(
            "UPDATE labels SET undone_at = ?2 WHERE id = ?1",
            params![id, now_rfc3339()],
        )?;
        tx.execute(
            "UPDATE assignments SET assigned_at = ?3, released = 0 WHERE item_id = ?1 AND labeler_id = ?2",
            params![item, labeler.id, unix_now()],
        )?;
        tx.commit()?;
        Ok(item)
    }

    /// Every live label, oldest first.
    pub fn labels(&self) -> Result<Vec<LabelRow>> {
        let mut st = self.conn.prepare(
            "SELECT l.id, l.client_id, l.item_id, b.name, l.kind, l.payload, l.created_at, l.seconds
             FROM labels l JOIN labelers b ON b.id = l.labeler_id
             WHERE l.undone_at IS NULL ORDER BY l.id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, f64>(7)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, client_id, item_id, labeler, kind, payload, created_at, seconds) = row?;
            out.push(LabelRow {
                id,
                client_id,
                item_id,
                labeler,
                kind,
                payload: json_col(payload, "labels.payload")?,
                created_at,
                seconds,
            });
        }
        Ok(out)
    }

    /// (live labels, all labels including undone ones).
    pub fn count_labels(&self) -> Result<(usize, usize)> {
        let (live, all): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*) FILTER (WHERE undone_at IS NULL), COUNT(*) FROM labels",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((live as usize, all as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let mode: String = s
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(s);
        // Reopening applies nothing (a second CREATE TABLE would fail).
        let s = Store::open(&path).unwrap();
        s.conn
            .execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(s);
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer than this rlhf"), "{err}");
    }

    #[test]
    fn a_version_one_file_is_migrated_to_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch("PRAGMA user_version = 1").unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let n: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'labels_by_labeler'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }
}
