/**
 * Signing defaults, apart from signing.ts so that the CLI can show them in its help
 * without loading node:crypto.
 */

/** How far a verifier's clock may be behind the signer's (an expiry is honoured this long after it passed). */
export const DEFAULT_CLOCK_SKEW_MS = 5 * 60_000
/** How long a signature is valid when neither --expires nor a previous signature says otherwise. */
export const DEFAULT_SIGNATURE_LIFETIME = '90d'
