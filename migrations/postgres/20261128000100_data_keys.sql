-- Crypto-shredding (domain.md, Erasure). Each subject whose personal data the log holds
-- encrypted (a lead's stream) has a data key of its own, stored wrapped by the master
-- key. Erasure destroys the key in the same transaction as the event that records it;
-- the row stays, without a key, as the subject's tombstone: its personal data reads as
-- erased from then on, even fields an older build stored in clear.
CREATE TABLE data_keys (
    subject     TEXT    NOT NULL PRIMARY KEY,
    -- nonce || AES-256-GCM(master wrapping key, data key); NULL once shredded.
    wrapped     BYTEA,
    created_at  TIMESTAMPTZ NOT NULL,
    shredded_at TIMESTAMPTZ
);

-- What tells the master key given at start from any other: a MAC of a fixed text under
-- a key derived from it, written by the first start (one row).
CREATE TABLE master_key_check (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    check_value BYTEA   NOT NULL
);
