//! `sluice teardown`: the end of a migration. Drops the replication slot (so the source
//! stops retaining WAL for it), the publication, and the target's `sluice` schema (position
//! row, deferred DDL). Nothing of the application's data is touched.
//!
//! It refuses while the daemon runs (its state dir is locked, or the slot is active on the
//! source: the daemon may run on another machine), and asks for confirmation: a dropped
//! slot cannot be recreated at the same position, so streaming can never resume.

use tokio_postgres::Client;

use crate::checkpoint;
use crate::config::Config;
use crate::error::{self, Error, Result};
use crate::source::quote_ident;

#[derive(Debug, clap::Args)]
pub struct TeardownArgs {
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub yes: bool,
}

async fn slot_state(source: &Client, slot: &str) -> Result<Option<Option<i32>>> {
    let row = source
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("Reading pg_replication_slots on the source", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// `sluice teardown`.
pub async fn command(config: &Config, args: &TeardownArgs) -> Result<i32> {
    let slot = &config.source.slot;
    let publication = &config.source.publication;
    if checkpoint::daemon_holds(&config.state.dir) {
        // Its PID, from its own status, when it answers.
        let pid = crate::control::client::request_status(&config.state.dir)
            .await
            .ok()
            .flatten()
            .and_then(|report| report.pid)
            .map_or_else(String::new, |pid| format!(", PID {pid}"));
        return Err(Error::definite(format!(
            "sluice run is running (it holds the state dir {}{pid}): stop it first (SIGTERM), then run sluice teardown again",
            config.state.dir.display()
        )));
    }
    let (source, target) = super::connect_both(config).await?;
    // After `cutover --freeze-source` the source database defaults to read-only
    // transactions; teardown's own session must still be able to drop the publication.
    source
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| error::pg("Preparing the teardown session on the source", e))?;
    let slot_exists = match slot_state(&source, slot).await? {
        Some(Some(pid)) => {
            return Err(Error::definite(format!(
                "Replication slot {slot} is in use by PID {pid} on the source (sluice run on another machine?): stop the daemon first, then run sluice teardown again"
            )))
        }
        Some(None) => true,
        None => false,
    };
    let publication_exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[publication],
        )
        .await
        .map_err(|e| error::pg("Reading pg_publication on the source", e))?
        .get(0);
    let schema_exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'sluice')",
            &[],
        )
        .await
        .map_err(|e| error::pg("Looking for schema sluice on the target", e))?
        .get(0);
    // Another migration into the same target (another slot) keeps its position in the
    // same table: the schema stays for it, only this slot's row goes. One from the same
    // source may stream through the same publication: that stays too.
    let other_slots: Vec<String> = match schema_exists {
        false => Vec::new(),
        true => target
            .query(
                "SELECT slot FROM sluice.applied_position WHERE slot <> $1 ORDER BY slot",
                &[slot],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .or_else(|e| match e.code() {
                // No position table (a schema run, never started): nobody else's.
                Some(code) if *code == tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
                    Ok(Vec::new())
                }
                _ => Err(error::pg(
                    "Reading sluice.applied_position on the target",
                    e,
                )),
            })?,
    };
    // Any other pgoutput slot of this source database may stream through the publication:
    // another migration into another target (its position rows are not here), or one with
    // its own state dir. A publication dropped under it cannot be mended (logical decoding
    // reads it as of each change), so it stays while such a slot exists.
    let other_slots_on_source: Vec<String> = source
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
             WHERE slot_type = 'logical' AND plugin = 'pgoutput' AND NOT temporary
               AND database = current_database() AND slot_name <> $1
             ORDER BY 1",
            &[slot],
        )
        .await
        .map_err(|e| error::pg("Reading pg_replication_slots on the source", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Only its owner (or a member of the owning role, or a superuser) may drop it: known
    // before anything is dropped, so the slot does not go first and the rest stay stuck.
    let publication_owner: Option<(bool, String)> = match publication_exists {
        false => None,
        true => {
            let row = source
                .query_one(
                    "SELECT pg_has_role(current_user, p.pubowner, 'USAGE')
                            OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                            p.pubowner::regrole::text
                     FROM pg_publication p WHERE p.pubname = $1",
                    &[publication],
                )
                .await
                .map_err(|e| error::pg("Reading pg_publication on the source", e))?;
            Some((row.get(0), row.get(1)))
        }
    };
    let mut left_alone: Vec<String> = Vec::new();
    // Something is left that the operator must see to (exit 1), not just kept for another.
    let mut left_to_do = false;
    let drop_publication = match &publication_owner {
        Some(_) if !other_slots_on_source.is_empty() => {
            left_alone.push(format!(
                "LEFT publication {publication}: slot(s) {} of this source database (another migration, or another pgoutput consumer) may stream through it, and a publication dropped under a slot cannot be mended; drop it when that one is torn down (DROP PUBLICATION {})",
                other_slots_on_source.join(", "),
                quote_ident(publication)
            ));
            false
        }
        Some((false, owner)) => {
            left_to_do = true;
            left_alone.push(format!(
                "LEFT publication {publication}: owned by {owner}, which this user may not drop; have {owner} (or a superuser) run DROP PUBLICATION {}",
                quote_ident(publication)
            ));
            false
        }
        Some((true, _)) => true,
        None => false,
    };

    // The state dir's checkpoint would make a later `run` on it resume from a slot that no
    // longer exists; it goes too, unless it belongs to another migration (another slot).
    let checkpoint = checkpoint::sled_path(&config.state.dir);
    let checkpoint_exists = checkpoint.is_dir()
        && {
            let store = checkpoint::Store::open(&config.state.dir)?;
            match store.identity()? {
                Some(identity) if identity.slot != *slot => {
                    crate::say!(
                    "The state dir {} belongs to slot {}, not {slot}: its checkpoint is left alone.",
                    config.state.dir.display(),
                    identity.slot
                );
                    false
                }
                _ => true,
            }
        };

    let mut plan = Vec::new();
    if slot_exists {
        plan.push(format!(
            "replication slot {slot} on the source {} (streaming can never resume)",
            config.source.conn.redacted()
        ));
    }
    if drop_publication {
        plan.push(format!("publication {publication} on the source"));
    }
    if schema_exists && other_slots.is_empty() {
        plan.push(format!(
            "schema sluice on the target {} (applied position, deferred DDL)",
            config.target.conn.redacted()
        ));
    } else if schema_exists {
        plan.push(format!(
            "the position row of slot {slot} in sluice.applied_position on the target {} (the schema stays: it holds the position of slot(s) {})",
            config.target.conn.redacted(),
            other_slots.join(", ")
        ));
    }
    if checkpoint_exists {
        plan.push(format!(
            "the checkpoint in the state dir {} (copy progress and position of this migration)",
            config.state.dir.display()
        ));
    }
    for item in &left_alone {
        crate::say!("{item}");
    }
    if plan.is_empty() {
        if !left_alone.is_empty() {
            return Ok(i32::from(left_to_do));
        }
        crate::say!("Nothing to tear down: no slot {slot}, no publication {publication}, no schema sluice on the target.");
        return Ok(0);
    }
    crate::say!("sluice teardown will drop:");
    for item in &plan {
        crate::say!("  - {item}");
    }
    if !super::confirm("Drop these?", args.yes, "nothing was dropped")? {
        return Err(Error::definite(
            "Teardown not confirmed: nothing was dropped. Answer yes to go ahead, or pass --yes",
        ));
    }

    if slot_exists {
        source
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .map_err(|e| {
                error::pg(
                    format!("Dropping replication slot {slot} on the source (if it became active, stop the daemon and run teardown again)"),
                    e,
                )
            })?;
        crate::say!("DROPPED replication slot {slot}");
    }
    // With the slot gone, what remains is cleanup: one step failing does not stop the
    // others, and all failures are reported at the end.
    let mut failed: Vec<String> = Vec::new();
    if drop_publication {
        match source
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(publication)
            ))
            .await
        {
            Ok(()) => crate::say!("DROPPED publication {publication}"),
            Err(e) => failed.push(
                error::pg(format!("Dropping publication {publication} on the source (drop it by hand: DROP PUBLICATION {})", quote_ident(publication)), e).report(),
            ),
        }
    }
    if schema_exists && other_slots.is_empty() {
        match target
            // Without the "drop cascades to ..." notices on stderr.
            .batch_execute(
                "SET client_min_messages = warning; DROP SCHEMA IF EXISTS sluice CASCADE",
            )
            .await
        {
            Ok(()) => crate::say!("DROPPED schema sluice on the target"),
            Err(e) => failed.push(
                error::pg("Dropping schema sluice on the target (drop it by hand: DROP SCHEMA sluice CASCADE)", e).report(),
            ),
        }
    } else if schema_exists {
        // This slot's copied-table positions go with its position row (kept where the
        // table does not exist, in schemas of earlier versions).
        let _ = target
            .execute("DELETE FROM sluice.table_sync WHERE slot = $1", &[slot])
            .await;
        match target
            .execute("DELETE FROM sluice.applied_position WHERE slot = $1", &[slot])
            .await
        {
            Ok(_) => crate::say!("DROPPED the position row of slot {slot} on the target"),
            Err(e) => failed.push(
                error::pg(format!("Deleting the position row of slot {slot} from sluice.applied_position on the target"), e).report(),
            ),
        }
    }
    if checkpoint_exists {
        if let Err(e) = std::fs::remove_dir_all(&checkpoint) {
            failed.push(format!(
                "Removing the checkpoint {}: {e}; delete it by hand before the next `sluice run`",
                checkpoint.display()
            ));
            return Err(Error::definite(failed.join("; ")));
        }
        // A socket left by a daemon that was killed; then the directory, if nothing of
        // anyone else's is in it.
        let _ = std::fs::remove_file(crate::control::socket::socket_path(&config.state.dir));
        let _ = std::fs::remove_dir(&config.state.dir);
        crate::say!(
            "DROPPED the checkpoint in the state dir {}",
            config.state.dir.display()
        );
    }
    if !failed.is_empty() {
        return Err(Error::definite(failed.join("; ")));
    }
    Ok(i32::from(left_to_do))
}
