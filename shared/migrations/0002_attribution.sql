-- Attribution reads: a contact's conversions (journey).
CREATE INDEX conversions_contact ON conversions (account_id, contact_phone) WHERE contact_phone IS NOT NULL;
