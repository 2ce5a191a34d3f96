"""The metric definitions of CONTRACT.md §3, as SQL, in one place.

Conversions: approved postback conversions (not reversed) plus revenue records of type ``sale``.
Revenue: the postback ledger (approvals net of reversals) plus every revenue record.
"""
from __future__ import annotations

# Per message: conversions and revenue. Parameter $1 is an array of message ids.
MESSAGE_OUTCOMES = """
SELECT m.id AS message_id,
       (SELECT count(*) FROM conversions c WHERE c.message_id = m.id AND c.status = 'approved')
     + (SELECT count(*) FROM revenue r WHERE r.message_id = m.id AND r.attribution_type = 'sale') AS conversions,
       coalesce((SELECT sum(a.amount) FROM conversion_adjustments a JOIN conversions c ON c.id = a.conversion_id
                  WHERE c.message_id = m.id), 0)
     + coalesce((SELECT sum(r.amount) FROM revenue r WHERE r.message_id = m.id), 0) AS revenue,
       (SELECT count(*) FROM clicks k WHERE k.message_id = m.id AND NOT k.is_bot) AS click_count,
       mc.clicked_at AS first_clicked_at
FROM messages m LEFT JOIN message_clicks mc ON mc.message_id = m.id
WHERE m.id = ANY($1::text[])
"""
