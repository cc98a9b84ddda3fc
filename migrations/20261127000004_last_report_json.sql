-- A cluster's last report is kept as the spoke sent it: `json` stores the text once Postgres
-- has checked it is JSON, where `jsonb` parsed it into a tree on every report (a tenth of
-- Postgres's time at fleet scale) only for the hub to turn it back into text when it reads it.
ALTER TABLE clusters ALTER COLUMN last_report TYPE json USING last_report::json;
-- A report of a cluster mid-upgrade is about 2 KiB, which put its row past the default
-- 2 KiB limit above which Postgres compresses values on every write. Rows up to a full page
-- stay as they are.
ALTER TABLE clusters SET (toast_tuple_target = 8160);
