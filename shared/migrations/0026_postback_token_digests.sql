-- Postback tokens are stored as SHA-256 digests, as API keys are: a copy of the database (a backup,
-- a replica, a support dump) no longer lets whoever holds it post conversions for every account.
-- A token is shown once, when it is made (create-account, rotate-postback-token).
--
-- Expand now, contract later: the plaintext columns stay, for the rows that have them, while a
-- gateway of the previous release may still run (it looks tokens up in them); this release writes
-- them only while some remain (shared/accounts.py), and `trackly admin forget-postback-tokens`
-- empties them once no such gateway runs.
-- The trigger keeps the digests right for whatever a previous release still writes there (an
-- account it creates, a token it rotates); emptying a plaintext column leaves its digest as it is.
-- The accounts table is small: one statement each.
ALTER TABLE accounts ADD COLUMN postback_token_hash bytea;
ALTER TABLE accounts ADD COLUMN previous_postback_token_hash bytea;
UPDATE accounts SET
    postback_token_hash = sha256(convert_to(postback_token, 'UTF8')),
    previous_postback_token_hash = sha256(convert_to(previous_postback_token, 'UTF8'));
ALTER TABLE accounts ALTER COLUMN postback_token_hash SET NOT NULL;
ALTER TABLE accounts ALTER COLUMN postback_token DROP NOT NULL;
CREATE UNIQUE INDEX accounts_postback_token_hash_key ON accounts (postback_token_hash);
CREATE UNIQUE INDEX accounts_previous_postback_token_hash_key ON accounts (previous_postback_token_hash)
    WHERE previous_postback_token_hash IS NOT NULL;

-- A previous release's rotation sets previous_postback_token from postback_token, which is empty
-- for an account this release made: the digest of the token replaced is moved over instead.
CREATE FUNCTION accounts_postback_token_digests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.postback_token IS NOT NULL AND NEW.postback_token IS DISTINCT FROM OLD.postback_token THEN
        IF TG_OP = 'UPDATE' THEN
            NEW.previous_postback_token_hash := OLD.postback_token_hash;
        END IF;
        NEW.postback_token_hash := sha256(convert_to(NEW.postback_token, 'UTF8'));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_postback_token_digests
    BEFORE INSERT OR UPDATE OF postback_token ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_postback_token_digests();
