/**
 * The origin server's limits (src/origin/server.ts says what each bounds), in a
 * module of their own so that `shoal origin serve --help` can show them without
 * loading the server.
 */
/** The server's limits; each is an option of startOriginServer / createOriginHandler. */
export const ORIGIN_SERVER_DEFAULTS = {
  /**
   * A response whose client takes no more bytes for this long is reset. Twice the
   * shoal client's own no-progress deadline (10 s, RetryOptions.requestTimeoutMs), so
   * a live agent always gives up first; a stalled client holds a descriptor, a file
   * and its kernel buffers (about 4 MB on Linux) for at most this long. Progress is
   * counted per piece, so a client slower than a piece per timeout (about 3 KB/s) is cut.
   */
  sendTimeoutMs: 20_000,
  /**
   * Open connections in all; more are closed as they are accepted (clients retry
   * with backoff). A burst of 512 agents at their default 8 connections; each costs
   * two descriptors (socket and blob file), ~8 k in all, well below the limit Node
   * raises itself to (the hard RLIMIT_NOFILE: 524288 under systemd, 1048576 in docker).
   */
  maxConnections: 4096,
  /**
   * Open connections per client address, an eighth of maxConnections: one address (a
   * misbehaving client, or a NAT in front of 64 agents at 8 connections each) cannot
   * take the whole server. Its further connections are answered 503 with Retry-After.
   */
  maxConnectionsPerClient: 512,
  /**
   * Pieces being read and written at once, over all responses. Enough to keep libuv's
   * 4 file threads and the sockets busy; few enough that a new request's own file
   * operations queue behind at most this many reads, not one per open response.
   */
  activePieces: 16,
  /** A piece: fs.ReadStream's default chunk; also the send timeout's unit of progress. */
  pieceBytes: 64 * 1024,
  /**
   * Time for a connection to send its request headers (Node's default is 60 s). A
   * GET's headers are one packet; this bounds connections that never send a request.
   */
  headersTimeoutMs: 10_000,
  /** Agents hold connections across bursts of range requests; Node's default of 5 s is short. */
  keepAliveTimeoutMs: 30_000,
  /** Retry-After (s) of the 503 a client over its connection cap gets. */
  retryAfterS: 1
} as const
