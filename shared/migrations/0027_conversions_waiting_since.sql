-- The sweeper's re-match (services/worker/attribution.py, rematch_stored) looks at conversions
-- judged click_not_found within its window. It went by created_at, taken as the only time a
-- conversion is judged so; but a conversion whose postbacks named no click takes the click a later
-- postback names, and is judged then, often long after its creation. If that click was being
-- drained at that moment, the drain's re-match could not see the conversion (not yet committed)
-- and the sweeper's window had long passed it: it waited for good (until a worker's start-up
-- re-match). ``waiting_since`` is when a later postback named its click (NULL: at creation); the
-- window goes by ``coalesce(waiting_since, created_at)``. Only the batch that names a click late
-- writes it, an update that changes click_id (in the index's predicate) anyway: status moves stay
-- HOT, as 0009 meant.
ALTER TABLE conversions ADD COLUMN waiting_since timestamptz;

CREATE INDEX conversions_waiting_click_since ON conversions ((coalesce(waiting_since, created_at)))
    WHERE NOT attributed AND unattributed_reason = 'click_not_found' AND click_id IS NOT NULL;
DROP INDEX conversions_waiting_click;
-- (A worker of the previous release still running during a rolling deploy goes by created_at: its
-- sweeps find those conversions without an index until it stops.)
