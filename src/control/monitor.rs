//! WAL-retention safety: the daemon samples the source's WAL position and its slot every
//! `monitor.interval` and keeps the status current.
//!
//! What the slot costs the source is `current WAL position - restart_lsn` (restart_lsn, not
//! confirmed_flush_lsn, is what holds WAL; it lags far behind). When that crosses
//! `monitor.retained_wal_warn` the monitor warns once per crossing (log and status). When the
//! source has invalidated the slot (`wal_status = lost`, after `max_slot_wal_keep_size` was
//! exceeded) or the slot vanished, streaming cannot continue without losing changes: that is
//! a definite error telling the operator a fresh copy is needed.
//!
//! Connection trouble with the source is never fatal here: the stream itself notices a dead
//! source and decides; the monitor logs, reconnects on its next tick and carries on.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{format_size, Config};
use crate::control::status::SharedStatus;
use crate::error::{self, Error, ErrorKind, Result};
use crate::lsn::Lsn;

/// One sample of the source's WAL position and slot.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSample {
    pub source_lsn: Lsn,
    /// `None` when the slot does not exist.
    pub slot: Option<SlotInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlotInfo {
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    pub active: bool,
    pub plugin: Option<String>,
}

impl SlotSample {
    /// WAL the slot holds on the source.
    pub fn retained_wal_bytes(&self) -> Option<u64> {
        let restart = self.slot.as_ref()?.restart_lsn?;
        Some(self.source_lsn.bytes_since(restart))
    }
}

/// Reads `pg_current_wal_lsn()` and the slot's row in `pg_replication_slots` in one query.
pub async fn sample_slot(source: &Client, slot: &str) -> Result<SlotSample> {
    let row = source
        .query_one(
            // wal_status and safe_wal_size arrive with PostgreSQL 13; reading them through
            // to_jsonb keeps the query valid on older sources (they are NULL there).
            "SELECT pg_current_wal_lsn()::text, s.slot_name IS NOT NULL,
                    s.confirmed_flush_lsn::text, s.restart_lsn::text,
                    to_jsonb(s) ->> 'wal_status', (to_jsonb(s) ->> 'safe_wal_size')::int8,
                    COALESCE(s.active, false), s.plugin::text
             FROM (SELECT 1) AS one
             LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| {
            error::pg(
                "Reading the source's WAL position and pg_replication_slots",
                e,
            )
        })?;
    let lsn = |index: usize| -> Result<Option<Lsn>> {
        row.get::<_, Option<String>>(index)
            .map(|text| {
                text.parse::<Lsn>().map_err(|e| {
                    Error::with_source(ErrorKind::Definite, "The source returned an invalid LSN", e)
                })
            })
            .transpose()
    };
    let source_lsn = lsn(0)?.unwrap_or_default();
    let exists: bool = row.get(1);
    let slot = if exists {
        Some(SlotInfo {
            confirmed_flush_lsn: lsn(2)?,
            restart_lsn: lsn(3)?,
            wal_status: row.get(4),
            safe_wal_size: row.get(5),
            active: row.get(6),
            plugin: row.get(7),
        })
    } else {
        None
    };
    Ok(SlotSample { source_lsn, slot })
}

/// The warning text for retained WAL over the bound (also the key to remove it again).
const RETAINED_PREFIX: &str = "Retained WAL";
const UNRESERVED_PREFIX: &str = "The slot's WAL is no longer reserved";

/// The error returned when the slot can no longer serve the changes sluice needs.
pub fn slot_lost_error(slot: &str, why: &str) -> Error {
    Error::definite(format!(
        "Replication slot {slot} {why}: the source no longer holds the WAL sluice still needs, so changes would be lost. {}",
        crate::daemon::FRESH_COPY
    ))
}

/// Samples every `config.monitor.interval` until the slot is lost (returns the definite
/// error). Transient source trouble is logged and retried; never returns `Ok` on its own, so
/// the daemon runs it beside the stream and stops it on shutdown.
pub async fn run(
    config: &Config,
    status: SharedStatus,
    store: crate::checkpoint::Store,
) -> Result<()> {
    let slot = config.source.slot.as_str();
    let interval = config.monitor.interval;
    let mut monitor = Monitor::new(slot, config.monitor.retained_wal_warn);
    let mut client: Option<Client> = None;
    let mut failures: u32 = 0;
    let mut publication: Option<PublicationShape> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match crate::tls::connect(&config.source.conn, "the source").await {
                Ok(c) => client = Some(c),
                Err(error) => {
                    failures += 1;
                    note_failure(failures, &error);
                    tokio::time::sleep(backoff(interval, failures)).await;
                    continue;
                }
            }
        }
        let Some(source) = client.as_ref() else {
            continue;
        };
        match sample_slot(source, slot).await {
            Ok(sample) => {
                failures = 0;
                monitor.apply(&sample, &status)?;
                // A look that fails (connection lost, or the catalog changing under the
                // query: `DROP PUBLICATION` racing it says "publication does not exist") is
                // the next look's; only the check's own verdict stops the daemon.
                if let Err(error) =
                    check_publication(source, config, &status, &store, &mut publication).await
                {
                    if !error.is_transient() {
                        return Err(error);
                    }
                    failures += 1;
                    note_failure(failures, &error);
                    tokio::time::sleep(backoff(interval, failures)).await;
                    continue;
                }
            }
            Err(error) => {
                failures += 1;
                note_failure(failures, &error);
                client = None;
                tokio::time::sleep(backoff(interval, failures)).await;
                continue;
            }
        }
        // Started beside the daemon's start-up, the monitor may look before the slot is
        // created: look again soon, so status shows the slot's figures right after.
        let next = match monitor.seen_slot {
            true => interval,
            false => interval.min(Duration::from_millis(200)),
        };
        tokio::time::sleep(next).await;
    }
}

/// What the publication looked like at the first look while streaming: its options, and per
/// streamed table the relation it publishes and how (row filter, column list).
#[derive(Debug, Clone, PartialEq)]
struct PublicationShape {
    /// insert, update, delete, truncate, publish_via_partition_root.
    options: [bool; 5],
    /// `schema.table` → (relation OID, the publication's entry for it: its OID, row filter
    /// and column list; `None` for a publication of all tables or of a schema).
    tables: HashMap<String, (u32, Option<String>)>,
}

impl PublicationShape {
    fn restore_options(&self, publication: &str) -> String {
        let operations: Vec<&str> = ["insert", "update", "delete", "truncate"]
            .iter()
            .zip(&self.options)
            .filter(|(_, on)| **on)
            .map(|(name, _)| *name)
            .collect();
        format!(
            "ALTER PUBLICATION {} SET (publish = '{}', publish_via_partition_root = {})",
            crate::source::quote_ident(publication),
            operations.join(", "),
            self.options[4]
        )
    }
}

/// The publication must go on publishing every table being streamed, as it did. Altered on
/// the source while sluice runs (`ALTER PUBLICATION ... DROP TABLE` or `SET (publish =
/// ...)`, a row filter or column list added, `DROP PUBLICATION`, a table dropped and
/// created again or another renamed to its name), the source just stops sending some
/// changes, or sends another table's under the old name: nothing in the stream says so.
/// Stopping is the only way not to be silent about it.
async fn check_publication(
    source: &Client,
    config: &Config,
    status: &SharedStatus,
    store: &crate::checkpoint::Store,
    baseline: &mut Option<PublicationShape>,
) -> Result<()> {
    let report = status.snapshot();
    let streaming: Vec<String> = report
        .tables
        .iter()
        .filter(|t| t.state == crate::control::TableState::Streaming)
        .map(|t| t.name.clone())
        .collect();
    let streams = report.state == crate::control::DaemonState::Streaming && !streaming.is_empty();
    let publication = &config.source.publication;
    // to_jsonb reads prqual and prattrs where the server has them (15+).
    let rows = source
        .query(
            "SELECT p.pubname IS NOT NULL, t.schemaname::text, c.oid,
                    ARRAY[p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot],
                    (SELECT concat_ws(' | ', pr.oid, to_jsonb(pr) ->> 'prqual', to_jsonb(pr) ->> 'prattrs')
                     FROM pg_catalog.pg_publication_rel pr
                     WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid),
                    t.tablename::text
             FROM (SELECT 1) one
             LEFT JOIN pg_catalog.pg_publication p ON p.pubname = $1
             LEFT JOIN pg_catalog.pg_publication_tables t ON t.pubname = p.pubname
             LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = t.schemaname
             LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename",
            &[publication],
        )
        .await
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Transient,
                "Reading the publication's tables on the source",
                e,
            )
        })?;
    let exists = rows.first().is_some_and(|row| row.get::<_, bool>(0));
    if !exists && !streams {
        // Not created yet (the daemon is starting), or the stream reports it.
        return Ok(());
    }
    if !exists {
        return Err(Error::definite(format!(
            "Publication {publication} was dropped on the source while sluice streamed: the source stopped sending changes, and logical decoding reads a publication as of each change's position, so creating it again does not bring back the changes in between. {}",
            crate::daemon::FRESH_COPY
        )));
    }
    let options: Vec<bool> = rows[0].get(3);
    let mut shape = PublicationShape {
        options: [0, 1, 2, 3, 4].map(|i| options.get(i).copied().unwrap_or(false)),
        tables: HashMap::new(),
    };
    for row in &rows {
        if let (Some(schema), Some(table), Some(oid)) = (
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(5),
            row.get::<_, Option<u32>>(2),
        ) {
            // Named as the status names its tables.
            let name = crate::source::TableName::new(schema, table).to_string();
            shape.tables.insert(name, (oid, row.get(4)));
        }
    }
    // The first look is the reference, taken as early as the publication exists (during
    // the copy too), so a change right after streaming starts is not taken for the start.
    let before = baseline.get_or_insert_with(|| shape.clone());
    if !streams {
        return Ok(());
    }

    // Per streamed table: what happened to it, if anything. Not when the options changed:
    // with publish_via_partition_root off, the publication lists partitions instead of
    // their roots, and every root would read as taken out of it (the options' message
    // covers every table).
    let mut changed: Vec<String> = Vec::new();
    let mut affected: Vec<String> = Vec::new();
    // Selected tables attached as partitions: their rows on the target stay (attached
    // there too); they are neither emptied nor copied again (a partition is never copied
    // on its own).
    let mut attached: Vec<String> = Vec::new();
    // Dropped: nothing to copy again. Renamed: copied again under the new name (changes
    // under it were held back until a start selects it), the old name is gone.
    let mut not_to_copy: Vec<String> = Vec::new();
    let mut renamed: Vec<String> = Vec::new();
    let options_changed = before.options != shape.options;
    for name in streaming.iter().filter(|_| !options_changed) {
        let was = before.tables.get(name);
        let reason = match (was, shape.tables.get(name)) {
            (_, None) => {
                let renamed_to = was.and_then(|(was_oid, _)| {
                    shape
                        .tables
                        .iter()
                        .find(|(_, (oid, _))| oid == was_oid)
                        .map(|(new_name, _)| new_name.clone())
                });
                // What became of it, by its OID: dropped, attached as a partition, or
                // only taken out of the publication.
                // By the OID seen before, or (no look before) by the name.
                let was_oid: Option<u32> = was.map(|(oid, _)| *oid);
                let quoted = crate::source::TableName::parse_shown(name)
                    .map_or_else(|| name.clone(), |t| t.quoted());
                type Fate = (bool, Option<String>, String);
                let fate: Option<Option<Fate>> = source
                    .query_opt(
                        "SELECT c.relispartition,
                                (SELECT i.inhparent::regclass::text FROM pg_catalog.pg_inherits i
                                 WHERE i.inhrelid = c.oid LIMIT 1),
                                n.nspname::text, c.relname::text
                         FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = coalesce($1::oid, pg_catalog.to_regclass($2)::oid)",
                        &[&was_oid, &quoted],
                    )
                    .await
                    .ok()
                    .map(|row| {
                        row.map(|row| {
                            let now = crate::source::TableName::new(
                                row.get::<_, String>(2),
                                row.get::<_, String>(3),
                            );
                            (row.get(0), row.get(1), now.to_string())
                        })
                    });
                Some(match (renamed_to, fate) {
                    (Some(new_name), _) => {
                        not_to_copy.push(name.clone());
                        renamed.push(new_name.clone());
                        format!(
                            "{name} was renamed to {new_name} (rename it on the target too, and make [tables] select the new name)"
                        )
                    }
                    (None, Some(None)) => {
                        not_to_copy.push(name.clone());
                        format!(
                            "{name} was dropped on the source (take it out of [tables]; its rows stay on the target)"
                        )
                    }
                    (None, Some(Some((true, parent, _)))) => {
                        attached.push(name.clone());
                        format!(
                            "{name} was attached as a partition of {} on the source: its changes now arrive as that table's (attach it on the target too, ALTER TABLE ... ATTACH PARTITION, and take {name} out of [tables]; its rows on the target are kept, so it is not emptied or copied again)",
                            parent.unwrap_or_else(|| "another table".to_string())
                        )
                    }
                    // Moved to another schema (or renamed) out of a publication of a schema.
                    (None, Some(Some((false, _, now)))) if now != *name => format!(
                        "{name} is now {now} (renamed, or moved to another schema), which the publication does not publish: its changes since then were not sent (move or rename it back, or publish {now} and rename it on the target too, making [tables] select the new name)"
                    ),
                    _ => format!(
                        "no longer publishes {name}: its changes since then were not sent (put it back: ALTER PUBLICATION {} ADD TABLE {}; if it was dropped on the source, take it out of [tables] instead)",
                        crate::source::quote_ident(publication),
                        quoted
                    ),
                })
            }
            (Some((was_oid, _)), Some((oid, _))) if oid != was_oid => Some(format!(
                "{name} is another table now (dropped and created again, or another table renamed to its name): the target holds the old one's rows"
            )),
            (Some((_, was_entry)), Some((_, entry))) if entry != was_entry => Some(format!(
                "{name} was taken out of the publication and put back, or given another row filter or column list: changes in between, or outside the new filter, were not sent (restore its definition in the publication)"
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            changed.push(reason);
            affected.push(name.clone());
        }
    }
    affected.retain(|name| !attached.contains(name));
    let mut to_copy: Vec<String> = affected
        .iter()
        .filter(|name| !not_to_copy.contains(name))
        .cloned()
        .collect();
    to_copy.extend(renamed);
    if options_changed {
        changed.insert(
            0,
            format!(
                "its options changed (the operations it publishes, or publish_via_partition_root): changes no longer published were not sent; restore them ({})",
                before.restore_options(publication)
            ),
        );
        affected = streaming.clone();
    }
    if changed.is_empty() {
        return Ok(());
    }
    let then = match forget_copies(config, store, &affected)? {
        _ if to_copy.is_empty() => "Then start `sluice run` again".to_string(),
        true => format!(
            "Then empty {} on the target (TRUNCATE) and start `sluice run` again: it copies them afresh before streaming resumes, and skips the changes that copy already holds",
            to_copy.join(", ")
        ),
        false => format!(
            "Then bring {} on the target up to date yourself (`sluice verify` shows what differs; the copy is off) and start `sluice run` again",
            to_copy.join(", ")
        ),
    };
    Err(Error::definite(format!(
        "Publication {publication} was altered on the source while sluice streamed, so sluice stopped rather than go on without some changes: {}. {then}",
        changed.join("; ")
    )))
}

/// With the copy on and finished, forgets the tables' copies (named as the status names
/// them) so the next start copies them afresh. Returns whether it did.
pub(crate) fn forget_copies(
    config: &Config,
    store: &crate::checkpoint::Store,
    tables: &[String],
) -> Result<bool> {
    if !config.copy.enabled {
        return Ok(false);
    }
    // The status's names are `TableName`'s `Display`; one that does not read back cannot be
    // forgotten, and the copy would silently be kept: say so.
    let tables = tables
        .iter()
        .map(|name| {
            crate::source::TableName::parse_shown(name).ok_or_else(|| {
                Error::definite(format!(
                    "Cannot read the table name {name:?} back to forget its copy: empty it on the target and remove the state dir's copy records by starting with a fresh copy"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::snapshot::forget_finished_copies(store, &tables)
}

/// Logs a failed sample: the first at warn, repeats at debug so a long outage does not flood
/// the log (the stream reports the outage itself).
fn note_failure(failures: u32, error: &Error) {
    if failures == 1 {
        tracing::warn!(error = %error.report(), "WAL monitor: cannot sample the source; retrying");
    } else {
        tracing::debug!(error = %error.report(), failures, "WAL monitor: still cannot sample the source");
    }
}

fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(5);
    interval
        .saturating_mul(factor)
        .min(Duration::from_secs(30))
        .max(interval)
}

/// The monitor's memory between samples: whether it warned already, whether it ever saw
/// the slot.
#[derive(Debug)]
pub struct Monitor {
    slot: String,
    retained_wal_warn: u64,
    over_bound: bool,
    unreserved: bool,
    seen_slot: bool,
}

impl Monitor {
    pub fn new(slot: &str, retained_wal_warn: u64) -> Self {
        Monitor {
            slot: slot.to_string(),
            retained_wal_warn,
            over_bound: false,
            unreserved: false,
            seen_slot: false,
        }
    }

    /// Folds one sample into the status; the definite error when the slot is lost.
    pub fn apply(&mut self, sample: &SlotSample, status: &SharedStatus) -> Result<()> {
        let Some(slot) = &sample.slot else {
            status.update(|s| s.source_lsn = Some(sample.source_lsn));
            if self.seen_slot {
                let error = slot_lost_error(&self.slot, "disappeared from the source (dropped?)");
                status.update(|s| s.last_error = Some(error.report()));
                return Err(error);
            }
            // The daemon creates the slot before starting the monitor; a missing slot before
            // it was ever seen is a start-up race, not a loss.
            return Ok(());
        };
        // A slot still being created (no confirmed position yet: one a killed start left
        // waiting for the source's open transactions) may yet vanish with its session; only
        // a made slot that goes missing is a loss.
        self.seen_slot |= slot.confirmed_flush_lsn.is_some();
        if slot.wal_status.as_deref() == Some("lost") {
            let error = slot_lost_error(
                &self.slot,
                "was invalidated by the source (wal_status = lost, max_slot_wal_keep_size exceeded)",
            );
            status.update(|s| {
                s.wal_status = Some("lost".into());
                s.last_error = Some(error.report());
            });
            return Err(error);
        }
        let retained = sample.retained_wal_bytes();
        let over = retained.is_some_and(|r| r > self.retained_wal_warn);
        let over_text = retained.filter(|_| over).map(|r| {
            format!(
                "{RETAINED_PREFIX} {} is over monitor.retained_wal_warn {}: the slot holds WAL on the source until sluice catches up; watch the source's disk",
                format_size(r),
                format_size(self.retained_wal_warn)
            )
        });
        // Logged once per crossing; the status warning stays (with a current figure) while
        // the condition lasts.
        if let (Some(text), false) = (&over_text, self.over_bound) {
            tracing::warn!(slot = %self.slot, retained_wal_bytes = retained, "{text}");
        } else if !over && self.over_bound {
            tracing::info!(slot = %self.slot, retained_wal_bytes = retained, "retained WAL is back under monitor.retained_wal_warn");
        }
        self.over_bound = over;
        let unreserved = slot.wal_status.as_deref() == Some("unreserved");
        let unreserved_text = unreserved.then(|| {
            format!(
                "{UNRESERVED_PREFIX} (wal_status = unreserved): the source will invalidate slot {} at its next checkpoint unless sluice catches up; raise max_slot_wal_keep_size now",
                self.slot
            )
        });
        if let (Some(text), false) = (&unreserved_text, self.unreserved) {
            tracing::warn!(slot = %self.slot, "{text}");
        }
        self.unreserved = unreserved;

        status.update(|s| {
            s.source_lsn = Some(sample.source_lsn);
            s.confirmed_flush_lsn = slot.confirmed_flush_lsn;
            s.restart_lsn = slot.restart_lsn;
            s.retained_wal_bytes = retained;
            s.wal_status = slot.wal_status.clone();
            s.safe_wal_size = slot.safe_wal_size;
            s.refresh_lag();
            // Only this monitor's warnings are replaced; others' stay.
            s.warnings
                .retain(|w| !w.starts_with(RETAINED_PREFIX) && !w.starts_with(UNRESERVED_PREFIX));
            s.warnings.extend(over_text);
            s.warnings.extend(unreserved_text);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(source: u64, restart: u64, wal_status: &str) -> SlotSample {
        SlotSample {
            source_lsn: Lsn(source),
            slot: Some(SlotInfo {
                confirmed_flush_lsn: Some(Lsn(restart)),
                restart_lsn: Some(Lsn(restart)),
                wal_status: Some(wal_status.into()),
                safe_wal_size: None,
                active: true,
                plugin: Some("pgoutput".into()),
            }),
        }
    }

    #[test]
    fn a_report_between_samples_never_shows_the_source_behind_the_stream() {
        let status = SharedStatus::new("sluice");
        status.update(|s| s.caught_up_lsn = Some(Lsn(900)));
        let mut monitor = Monitor::new("sluice", u64::MAX);
        monitor
            .apply(&sample(1000, 500, "reserved"), &status)
            .unwrap();
        // Before the next sample, the stream receives up to 1500 and 1400 is applied.
        status.update(|s| {
            s.received_lsn = Some(Lsn(1500));
            s.caught_up_lsn = Some(Lsn(1400));
        });
        let report = status.snapshot();
        assert_eq!(report.source_lsn, Some(Lsn(1500)));
        assert_eq!(report.lag_bytes, Some(100));
    }

    #[test]
    fn warns_once_per_crossing_and_clears() {
        let status = SharedStatus::new("sluice");
        status.update(|s| s.caught_up_lsn = Some(Lsn(900)));
        let mut monitor = Monitor::new("sluice", 1000);
        monitor
            .apply(&sample(1000, 500, "reserved"), &status)
            .unwrap();
        let report = status.snapshot();
        assert!(report.warnings.is_empty());
        assert_eq!(report.lag_bytes, Some(100));
        assert_eq!(report.retained_wal_bytes, Some(500));
        monitor
            .apply(&sample(3000, 500, "reserved"), &status)
            .unwrap();
        monitor
            .apply(&sample(4000, 500, "reserved"), &status)
            .unwrap();
        let warnings = status.snapshot().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("Retained WAL 3500 bytes"),
            "{warnings:?}"
        );
        monitor
            .apply(&sample(4000, 3900, "reserved"), &status)
            .unwrap();
        assert!(status.snapshot().warnings.is_empty());
    }

    #[test]
    fn other_warnings_are_kept() {
        let status = SharedStatus::new("sluice");
        status.update(|s| s.warnings.push("Something else".into()));
        let mut monitor = Monitor::new("sluice", 10);
        monitor
            .apply(&sample(1000, 0, "unreserved"), &status)
            .unwrap();
        assert_eq!(status.snapshot().warnings.len(), 3);
        monitor
            .apply(&sample(1000, 1000, "reserved"), &status)
            .unwrap();
        assert_eq!(
            status.snapshot().warnings,
            vec!["Something else".to_string()]
        );
    }

    #[test]
    fn a_lost_or_vanished_slot_is_definite() {
        let status = SharedStatus::new("sluice");
        let mut monitor = Monitor::new("sluice", 10);
        let error = monitor
            .apply(&sample(1000, 0, "lost"), &status)
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Definite);
        assert!(error.to_string().contains("fresh copy"), "{error}");

        let mut monitor = Monitor::new("sluice", 10);
        let gone = SlotSample {
            source_lsn: Lsn(5),
            slot: None,
        };
        monitor.apply(&gone, &status).unwrap();
        monitor
            .apply(&sample(1000, 0, "reserved"), &status)
            .unwrap();
        let error = monitor.apply(&gone, &status).unwrap_err();
        assert!(error.to_string().contains("disappeared"), "{error}");
        assert!(status.snapshot().last_error.unwrap().contains("fresh copy"));
    }
}
