-- Snapshots of leads held a lead's state, its email and name in clear; the store neither
-- takes nor reads them now (personal data is sealed, `store/src/personal.rs`).
DELETE FROM snapshots WHERE stream LIKE 'lead-%';
