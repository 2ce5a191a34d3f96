-- The sweeper's re-match looks only at conversions still waiting for their click that were
-- created recently (services/worker/attribution.py, REMATCH_WINDOW): it used to read every
-- such conversion of every account ever, every 2 s (click ids that never arrive pile up).
-- Keyed on created_at, which no update writes: an index on a column that status moves write
-- (updated_at) would make every move of every conversion a non-HOT update.
CREATE INDEX conversions_waiting_click ON conversions (created_at)
    WHERE NOT attributed AND unattributed_reason = 'click_not_found' AND click_id IS NOT NULL;

-- The postback log filtered by state (GET /postbacks?state=): the same expression as
-- services/gateway/routes/postback_log.py's _STATE, so a rare state is found without walking
-- every postback of every account.
CREATE INDEX postbacks_account_state ON postbacks (
    account_id,
    (CASE WHEN is_duplicate THEN 'duplicate' WHEN process_error IS NOT NULL THEN 'failed'
          WHEN processed_at IS NULL THEN 'pending' ELSE 'processed' END),
    id DESC
);
