-- Revoking management tokens (`haltless token revoke`): JWTs are not stored,
-- so an organization records the moment before which its tokens no longer
-- count; a token issued (iat) earlier is refused. NULL: none revoked.
ALTER TABLE organizations ADD COLUMN tokens_valid_after timestamptz;
