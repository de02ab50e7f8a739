//! Who labels what. Each item goes to `overlap` different labelers and never twice to
//! the same one: an assignment is a row keyed by (item, labeler), written when the
//! item is handed out, so a labeler can hold an item at most once in the store's
//! life. A slot of an item is taken by a labeler who labeled it, or who holds it
//! and has not answered within the lease; a skip frees the slot for someone else
//! (the skipper keeps the assignment, so they are not asked again).
//!
//! The queue is ordered by `items.priority` (lower first; active selection writes
//! it) and then by file order. Among items with free slots the first in that order is
//! handed out, so items fill up one after another and agreement can be measured early.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::error::Result;
use super::store::{unix_now, Labeler, NewLabel, Store, Stored};

/// A labeler's place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Live labels of this labeler (skips included).
    pub done: usize,
    /// Items this labeler could still be given (free slots they never held), plus the
    /// one they hold.
    pub remaining: usize,
}

/// The SQL condition "item `i` has a free slot at time ?2 for overlap ?3".
const HAS_ROOM: &str = "(SELECT COUNT(*) FROM assignments a
      LEFT JOIN labels l ON l.item_id = a.item_id AND l.labeler_id = a.labeler_id
                        AND l.undone_at IS NULL
      WHERE a.item_id = i.id AND a.released = 0
        AND ((l.id IS NOT NULL AND l.kind != 'skip') OR (l.id IS NULL AND a.assigned_at > ?2))) < ?3";

/// Whether `labeler`'s hold on `item` still has its slot: within the lease, or past
/// it while no one else has filled the slot. A submission on a hold that lost its
/// slot is refused, so an item never gets more than `overlap` labels.
fn hold_is_valid(
    conn: &rusqlite::Connection,
    item: i64,
    labeler: i64,
    lease_s: f64,
    overlap: i64,
) -> Result<bool> {
    let now = unix_now();
    let at: f64 = conn.query_row(
        "SELECT assigned_at FROM assignments WHERE item_id = ?1 AND labeler_id = ?2",
        params![item, labeler],
        |r| r.get(0),
    )?;
    if at > now - lease_s {
        return Ok(true);
    }
    let room: i64 = conn.query_row(
        &format!(
            "SELECT {} FROM items i WHERE i.id = ?1",
            HAS_ROOM.replace("a.released = 0", "a.released = 0 AND a.labeler_id != ?4")
        ),
        params![item, now - lease_s, overlap, labeler],
        |r| r.get(0),
    )?;
    Ok(room == 1)
}

impl Store {
    /// `submit`, refusing a hold older than `lease_s` whose slot another labeler
    /// has taken since (the item would get more than `overlap` labels).
    pub fn submit_within(
        &mut self,
        labeler: &Labeler,
        label: &NewLabel,
        lease_s: f64,
    ) -> Result<Stored> {
        let overlap = self.project()?.overlap as i64;
        self.submit_checked(labeler, label, &|conn, item, who| {
            hold_is_valid(conn, item, who, lease_s, overlap)
        })
    }

    /// The item `labeler` should label next, assigning it if new: the one they hold
    /// and have not answered (after an undo or a reload), else the first item of the
    /// queue with a free slot that they never held. `lease_s`: how long a held item
    /// keeps its slot without an answer.
    pub fn next_item(&mut self, labeler: &Labeler, lease_s: f64) -> Result<Option<i64>> {
        let overlap = self.project()?.overlap as i64;
        let now = unix_now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let held = tx
            .query_row(
                "SELECT a.item_id, a.assigned_at FROM assignments a
                 WHERE a.labeler_id = ?1 AND a.released = 0 AND NOT EXISTS (
                     SELECT 1 FROM labels l WHERE l.item_id = a.item_id
                       AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL)
                 ORDER BY a.assigned_at DESC LIMIT 1",
                params![labeler.id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?)),
            )
            .optional()?;
        if let Some((item, _)) = held {
            if hold_is_valid(&tx, item, labeler.id, lease_s, overlap)? {
                // Within the lease, or past it while its slot is still free: keep it
                // (a renewed lease).
                tx.execute(
                    "UPDATE assignments SET assigned_at = ?3 WHERE item_id = ?1 AND labeler_id = ?2 AND assigned_at <= ?4",
                    params![item, labeler.id, now, now - lease_s],
                )?;
                tx.commit()?;
                return Ok(Some(item));
            }
            // The lease ran out and the slot went to someone else: let it go (the row
            // stays, so the item is never handed to this labeler again).
            tx.execute(
                "UPDATE assignments SET released = 1 WHERE item_id = ?1 AND labeler_id = ?2",
                params![item, labeler.id],
            )?;
        }
        let next = tx
            .query_row(
                &format!(
                    "SELECT i.id FROM items i
                     WHERE NOT EXISTS (SELECT 1 FROM assignments a
                                       WHERE a.item_id = i.id AND a.labeler_id = ?1)
                       AND {HAS_ROOM}
                     ORDER BY i.priority IS NULL, i.priority, i.position LIMIT 1"
                ),
                params![labeler.id, now - lease_s, overlap],
                |r| r.get::<_, i64>(0),
            )
            .optional()?;
        if let Some(item) = next {
            tx.execute(
                "INSERT INTO assignments (item_id, labeler_id, assigned_at) VALUES (?1, ?2, ?3)",
                params![item, labeler.id, now],
            )?;
        }
        tx.commit()?;
        Ok(next)
    }

    /// How far `labeler` is.
    pub fn progress(&self, labeler: &Labeler, lease_s: f64) -> Result<Progress> {
        let overlap = self.project()?.overlap as i64;
        let done: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM labels WHERE labeler_id = ?1 AND undone_at IS NULL",
            params![labeler.id],
            |r| r.get(0),
        )?;
        let open: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM items i
             WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.labeler_id = ?1)
               AND {HAS_ROOM}"
                .replace("{HAS_ROOM}", HAS_ROOM)
                .as_str(),
            params![labeler.id, unix_now() - lease_s, overlap],
            |r| r.get(0),
        )?;
        let held: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM assignments a WHERE a.labeler_id = ?1 AND a.released = 0
               AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = a.item_id
                               AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL)",
            params![labeler.id],
            |r| r.get(0),
        )?;
        Ok(Progress {
            done: done as usize,
            remaining: (open + held) as usize,
        })
    }
}
