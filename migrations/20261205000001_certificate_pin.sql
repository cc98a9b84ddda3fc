-- The SHA-256 of the serving certificate a spoke registered: the hub pushes only to an
-- endpoint presenting that certificate. NULL: the spoke serves plain HTTP, or its
-- certificate is checked against the usual roots.
ALTER TABLE clusters ADD COLUMN certificate_sha256 TEXT;
