-- When the hub stops accepting a cluster's credential (`--cluster-credential-ttl` after it
-- was issued). NULL: issued before credentials expired; it lasts until the agent registers
-- anew or renews it.
ALTER TABLE clusters ADD COLUMN credential_expires_at TIMESTAMPTZ;
