-- Every first click of a message updates its contact (click_count, last_clicked_at: no indexed
-- column), from the click drainer and /history/clicks. Contacts are written once by a send and
-- packed full, so each such update moved the row to another page and added an entry to both of
-- its indexes. With room left on each page the update stays on the page (a HOT update: no index
-- entry): /history/clicks' 1000 contact updates took 9.5 ms instead of 12. Applies to pages
-- written from now on.
ALTER TABLE contacts SET (fillfactor = 85);
