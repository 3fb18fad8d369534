-- The devices of a user that ever uploaded KeyPackages, for the device bound
-- (storage/quotas.py) and for claims, which go through every such device:
-- without this index both scanned the whole table (the partial index of 0002
-- holds unclaimed rows only).
CREATE INDEX key_packages_user_device_idx ON key_packages (user_did, device_id);
