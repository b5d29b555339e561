/**
 * Every default of `shoal convertd` (the convert-on-push service), in one place.
 * The config file and flags override the ones marked so in src/convertd/config.ts.
 */
export const CONVERTD_DEFAULTS = {
  /** Where the registry's notifications come in, and /metrics. Loopback unless asked: the registry is usually beside it. */
  listen: '127.0.0.1:8910',
  stateDir: '/var/lib/shoal-convertd',
  /**
   * Conversions at once. A conversion is CPU-bound (hashing, zstd on the thread pool)
   * and streams through a bounded buffer, so more than the cores only adds memory.
   */
  concurrency: 2,
  /** Tries per job before it ends as failed (the first one included). */
  maxAttempts: 4,
  /** Backoff before try n+1: retryBaseMs * 2^(n-1), at most retryMaxMs. A registry restart or a full disk gets time to pass. */
  retryBaseMs: 10_000,
  retryMaxMs: 600_000,
  /**
   * How often the workers look at the queue besides when an event arrives: picks up
   * jobs `shoal convertd sync` (another process) queued and retries that fell due.
   */
  pollMs: 2_000,
  /** Destination tag of a converted image; {tag} is the source tag. The digest tag sha256-<hex>.shoal is always written too. */
  destinationTag: '{tag}-shoal',
  /** Destination repository; {repo} is the source repository. Nodes look for conversions in the image's own repository. */
  destinationRepository: '{repo}',
  /**
   * A notification envelope larger than this is refused (413). docker-registry sends
   * at most `threshold` events per envelope, each well under 2 KiB.
   */
  maxEnvelopeBytes: 1 << 20,
  /** After SIGTERM/SIGINT the service exits within this, whatever a conversion does; the job is resumed by the next start. */
  shutdownGraceMs: 5_000,
  /** A running job's progress is written to the state database at most this often (what `status` shows). */
  progressWriteMs: 1_000,
  /** The token file must hold at least this many characters: the token is all that guards the queue. */
  minTokenLength: 16,
  /** `shoal convertd status` lists this many recent jobs by default. */
  statusLimit: 20
} as const

/** The media type docker-registry (distribution 2.x) posts notification envelopes as. */
export const EVENTS_MEDIA_TYPE = 'application/vnd.docker.distribution.events.v1+json'

/** The state database's file name in the state directory. */
export const QUEUE_FILE = 'queue.db'
/** Conversions are staged here (one directory per running job), emptied on every start. */
export const WORK_DIR = 'work'
