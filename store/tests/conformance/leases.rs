//! Leases (`annals_store::leases`), on both backends: one holder at a time; a lease not
//! renewed expires by the database's clock and another takes it over at a higher epoch;
//! the old holder can then neither renew it nor commit a transaction fenced by it;
//! a release frees it at once; one whose holder is a process of this host that is gone
//! is taken over at once.

use std::sync::Arc;
use std::time::Duration;

use crate::database::Fixture;

on_both_backends!(
    a_lease_is_refused_to_a_second_holder_while_held,
    a_lease_not_renewed_expires_and_is_taken_over_at_a_higher_epoch,
    a_transaction_fenced_by_a_lease_taken_over_is_refused_and_rolls_back,
    a_released_lease_is_taken_at_once,
    a_lease_s_expiry_is_the_database_s_clock,
    a_lease_held_by_a_process_gone_from_this_host_is_taken_at_once,
);

const LIFE: Duration = Duration::from_millis(600);

async fn a_lease_is_refused_to_a_second_holder_while_held(db: Arc<Fixture>) {
    let tables = db.tables();
    let first = tables.try_lease("work", "a", LIFE).await.unwrap().unwrap();
    assert_eq!(first.epoch, 1);
    // From another store, as another process would.
    let other = db.open_again_tables().await;
    assert_eq!(other.try_lease("work", "b", LIFE).await.unwrap(), None);
    // A renewal keeps it past its first life.
    for _ in 0..4 {
        tokio::time::sleep(LIFE / 3).await;
        assert!(tables.renew_lease(&first, LIFE).await.unwrap());
        assert_eq!(other.try_lease("work", "b", LIFE).await.unwrap(), None);
    }
    // Another name is another lease.
    assert!(other.try_lease("other", "b", LIFE).await.unwrap().is_some());
}

async fn a_lease_not_renewed_expires_and_is_taken_over_at_a_higher_epoch(db: Arc<Fixture>) {
    let tables = db.tables();
    let first = tables.try_lease("work", "a", LIFE).await.unwrap().unwrap();
    tokio::time::sleep(LIFE + Duration::from_millis(100)).await;
    // Not taken over yet: its holder may still renew it after its expiry.
    assert!(tables.renew_lease(&first, LIFE).await.unwrap());
    assert_eq!(tables.try_lease("work", "b", LIFE).await.unwrap(), None);
    tokio::time::sleep(LIFE + Duration::from_millis(100)).await;
    let second = tables.try_lease("work", "b", LIFE).await.unwrap().unwrap();
    assert!(second.epoch > first.epoch, "{second:?} after {first:?}");
    assert!(
        !tables.renew_lease(&first, LIFE).await.unwrap(),
        "the old holder renews a lease taken over"
    );
    let state = tables.lease("work").await.unwrap().unwrap();
    assert_eq!((state.holder.as_str(), state.epoch), ("b", second.epoch));
    assert!(!state.expired());
    assert_eq!(tables.lease("other work").await.unwrap(), None);
    // The same holder taking it again after its own expiry gets a new epoch too.
    tokio::time::sleep(LIFE + Duration::from_millis(100)).await;
    let third = tables.try_lease("work", "b", LIFE).await.unwrap().unwrap();
    assert!(third.epoch > second.epoch);
    assert!(!tables.renew_lease(&second, LIFE).await.unwrap());
}

async fn a_transaction_fenced_by_a_lease_taken_over_is_refused_and_rolls_back(db: Arc<Fixture>) {
    let tables = db.tables();
    db.execute("CREATE TABLE fenced (n BIGINT NOT NULL)").await;
    let first = tables.try_lease("work", "a", LIFE).await.unwrap().unwrap();
    let mut tx = tables.begin_write().await.unwrap();
    assert!(tx.fence(&first).await.unwrap(), "its own live lease passes");
    tx.execute("INSERT INTO fenced (n) VALUES (1)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    tokio::time::sleep(LIFE + Duration::from_millis(100)).await;
    // Expired and not yet taken over: refused as well (a holder past its life acts no more).
    let mut tx = tables.begin_write().await.unwrap();
    assert!(
        !tx.fence(&first).await.unwrap(),
        "an expired lease fences nothing"
    );
    drop(tx);
    let second = tables.try_lease("work", "b", LIFE).await.unwrap().unwrap();
    // The old holder wakes and tries to write under its old epoch: refused, and what it
    // wrote before asking is rolled back with the transaction.
    let mut tx = tables.begin_write().await.unwrap();
    tx.execute("INSERT INTO fenced (n) VALUES (2)", &[])
        .await
        .unwrap();
    assert!(!tx.fence(&first).await.unwrap());
    drop(tx);
    let mut tx = tables.begin_write().await.unwrap();
    assert!(tx.fence(&second).await.unwrap());
    tx.execute("INSERT INTO fenced (n) VALUES (3)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        db.text_rows("SELECT CAST(n AS TEXT) FROM fenced ORDER BY n")
            .await,
        vec![vec![Some("1".to_owned())], vec![Some("3".to_owned())]]
    );
}

async fn a_released_lease_is_taken_at_once(db: Arc<Fixture>) {
    let tables = db.tables();
    let life = Duration::from_secs(3600);
    let first = tables.try_lease("work", "a", life).await.unwrap().unwrap();
    assert_eq!(tables.try_lease("work", "b", life).await.unwrap(), None);
    // Only its holder at its epoch releases it.
    let mut stale = first.clone();
    stale.holder = "b".to_owned();
    tables.release_lease(&stale).await.unwrap();
    assert_eq!(tables.try_lease("work", "b", life).await.unwrap(), None);
    tables.release_lease(&first).await.unwrap();
    let second = tables.try_lease("work", "b", life).await.unwrap().unwrap();
    assert!(
        second.epoch > first.epoch,
        "epochs grow across a release too"
    );
    let mut tx = tables.begin_write().await.unwrap();
    assert!(!tx.fence(&first).await.unwrap());
    assert!(tx.fence(&second).await.unwrap());
}

/// The expiry is the database's clock plus the life, and it is judged by the database's
/// clock: moving the stored expiry (as the database's time passing would) is what lets
/// another holder in, whatever this process's clock says.
async fn a_lease_s_expiry_is_the_database_s_clock(db: Arc<Fixture>) {
    let tables = db.tables();
    let life = Duration::from_secs(3600);
    let first = tables.try_lease("work", "a", life).await.unwrap().unwrap();
    let state = tables.lease("work").await.unwrap().unwrap();
    let left = state.expires_micros - state.now_micros;
    assert!(
        (3_590_000_000..=3_600_000_000).contains(&left),
        "expires an hour after the database's now: {state:?}"
    );
    // The database's time passes the expiry (the row moved back by more than its life).
    db.execute("UPDATE leases SET expires_micros = expires_micros - 3600000001")
        .await;
    assert!(tables.lease("work").await.unwrap().unwrap().expired());
    let second = tables.try_lease("work", "b", life).await.unwrap().unwrap();
    assert!(second.epoch > first.epoch);
    let mut tx = tables.begin_write().await.unwrap();
    assert!(!tx.fence(&first).await.unwrap());
}

/// A server killed with SIGKILL leaves its leases live; one restarted on the same host
/// takes them at once, rather than waiting out their life. Only a process found gone:
/// another host's, another pid namespace's (a container with the same host name), or a
/// live one's of this host, is waited out.
async fn a_lease_held_by_a_process_gone_from_this_host_is_taken_at_once(db: Arc<Fixture>) {
    let tables = db.tables();
    let life = Duration::from_secs(3600);
    let mine = annals_store::holder_of_this_process();
    let (host_and_pid, _) = mine.rsplit_once(':').unwrap();
    let (host, _) = host_and_pid.rsplit_once(':').unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let hostname = mine.split(':').next().unwrap();
    let cases = [
        (format!("elsewhere:{pid}:0a1b2c3d"), false),
        // The same host name in another pid namespace (another container): waited out.
        (
            format!("{hostname}:0a1b2c3d-4026531836:{pid}:0a1b2c3d"),
            false,
        ),
        (format!("{host_and_pid}:0a1b2c3d"), false),
        (format!("{host}:{pid}:0a1b2c3d"), true),
    ];
    for (n, (holder, taken)) in cases.iter().enumerate() {
        let name = format!("work-{n}");
        let first = tables
            .try_lease(&name, holder, life)
            .await
            .unwrap()
            .unwrap();
        let second = tables.try_lease(&name, mine, life).await.unwrap();
        assert_eq!(second.is_some(), *taken, "{holder}");
        if let Some(second) = second {
            assert!(second.epoch > first.epoch);
            assert!(!tables.renew_lease(&first, life).await.unwrap());
        }
    }
}
