// sse-resilience.js: a browser client for event streams served through
// SseResilienceLayer. A dependency-free ES module.
//
//   import { ResilientStream } from "/sse-resilience.js";
//
//   const stream = new ResilientStream(`/api/stream/${id}`, {
//     statusUrl: `/api/status/${id}`,
//     events: ["token"],
//   });
//   stream.addEventListener("token", (e) => append(JSON.parse(e.data).text));
//   stream.addEventListener("completed", (e) => show(JSON.parse(e.data)));
//   stream.addEventListener("statuschange", (e) => render(e.detail.status));
//   stream.start();
//
// What the client does:
// - Before each connection it requests the recovery status (`statusUrl`). A
//   stream that already ended (completed, failed or orphaned) is not opened:
//   its terminal event from the status response is dispatched and the client
//   stops. A 400 response (invalid stream id) ends in `error`. Any other
//   response, or none, lets the client open the stream, because the
//   stream route decides as well.
// - It opens an EventSource and re-dispatches each event of a listened type
//   as a MessageEvent of the same type on the ResilientStream.
// - When the connection fails, it closes the EventSource and opens a new one
//   after an exponential backoff with jitter. The new request carries the
//   last event id in the `last_event_id` query parameter, so a layer with
//   its event log on resumes after that event. After `maxRetries` failed
//   attempts in a row it gives up with status `error`. An attempt that
//   delivers an event resets the count.
// - It stops at the terminal event: `completed` or `failed` by default, or a
//   `message` event whose data is a JSON object with a `type` of `completed`
//   or `failed` (the layer's default terminal rule).
//
// Events dispatched on a ResilientStream:
// - one MessageEvent per stream event, with the event's type, `data` and
//   `lastEventId`;
// - `statuschange`, a CustomEvent whose `detail` is `{ status, previous }`,
//   plus `error` (a message) on `error`, and `replayed: true` and
//   `truncated` when the end came from the status response;
// - `reconnect`, a CustomEvent whose `detail` is `{ attempt, delayMs,
//   lastEventId, reason }`, before each wait for a new attempt.
//
// Statuses: `idle` (before start), `connecting` (requesting the status,
// opening, or waiting to reconnect), `streaming` (the EventSource is open),
// `completed`, `failed` (the stream ended with a failure, or its server
// died), `error` (invalid id, or no connection after the retries), and
// `closed` (close() was called before an end).

const FINAL_STATUSES = new Set(["completed", "failed", "error", "closed"]);
const RESERVED_TYPES = new Set(["statuschange", "reconnect"]);

/** Options of a ResilientStream and their defaults. */
export const DEFAULT_OPTIONS = Object.freeze({
  /** URL of the recovery status of the stream; null skips the status request. */
  statusUrl: null,
  /** Event types to listen for, besides `completed`, `failed` and `gap`. */
  events: ["message"],
  /** Failed attempts in a row before the client gives up with `error`. */
  maxRetries: 8,
  /** Delay before the first reconnection, in milliseconds, before jitter. */
  initialDelayMs: 500,
  /** Upper bound of the reconnection delay, in milliseconds, before jitter. */
  maxDelayMs: 15000,
  /** Time limit of one status request, in milliseconds. */
  statusTimeoutMs: 10000,
  /** Last event id to resume after on the first connection ("" for none). */
  lastEventId: "",
  /** Sent to EventSource, and as `credentials: "include"` to fetch. */
  withCredentials: false,
  /** Decides whether an event ends the stream: returns "completed", "failed" or null. */
  terminal: defaultTerminal,
});

/**
 * Applies the layer's default terminal rule: an event of type `completed` or
 * `failed`, or a `message` event whose JSON data has such a `type`.
 */
export function defaultTerminal(type, data) {
  if (type === "completed" || type === "failed") {
    return type;
  }
  if (type !== "message") {
    return null;
  }
  try {
    const value = JSON.parse(data);
    if (value && (value.type === "completed" || value.type === "failed")) {
      return value.type;
    }
  } catch {
    // Data that is not JSON is not a terminal event.
  }
  return null;
}

/**
 * Returns the delay before reconnection attempt `attempt` (1-based): the
 * initial delay doubled per attempt, capped at the maximum, then a random
 * value between its half and itself.
 */
export function backoffDelay(attempt, initialDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** An event stream that requests its recovery status, reconnects and resumes. */
export class ResilientStream extends EventTarget {
  #url;
  #options;
  #status = "idle";
  #lastEventId;
  #attempts = 0;
  #source = null;
  #timer = null;
  #abort = null;
  // Increased by close() and at the end, so callbacks of an earlier run do nothing.
  #run = 0;

  /**
   * Creates a client for the stream at `url`; call start() to connect.
   * Throws a TypeError when an option is invalid.
   */
  constructor(url, options = {}) {
    super();
    this.#url = String(url);
    this.#options = { ...DEFAULT_OPTIONS, ...options };
    const { events, maxRetries, initialDelayMs, maxDelayMs, statusTimeoutMs, terminal } =
      this.#options;
    if (!Array.isArray(events)) {
      throw new TypeError("events must be an array of event types");
    }
    for (const type of events) {
      if (RESERVED_TYPES.has(type)) {
        throw new TypeError(`event type "${type}" is reserved by ResilientStream`);
      }
    }
    if (!Number.isInteger(maxRetries) || maxRetries < 0) {
      throw new TypeError(`maxRetries must be a whole number >= 0, got ${maxRetries}`);
    }
    for (const [name, value] of Object.entries({ initialDelayMs, maxDelayMs, statusTimeoutMs })) {
      if (!(Number.isFinite(value) && value > 0)) {
        throw new TypeError(`${name} must be a number of milliseconds > 0, got ${value}`);
      }
    }
    if (typeof terminal !== "function") {
      throw new TypeError("terminal must be a function of (type, data)");
    }
    this.#lastEventId = String(this.#options.lastEventId || "");
  }

  /** The current status: idle, connecting, streaming, completed, failed, error or closed. */
  get status() {
    return this.#status;
  }

  /** The id of the last event received, sent on the next reconnection ("" for none). */
  get lastEventId() {
    return this.#lastEventId;
  }

  /** Starts the stream. Does nothing when it was already started. Returns this. */
  start() {
    if (this.#status === "idle") {
      this.#attempt();
    }
    return this;
  }

  /** Closes the connection and cancels pending work. A stream not yet ended becomes `closed`. */
  close() {
    this.#run += 1;
    this.#stop();
    if (!FINAL_STATUSES.has(this.#status)) {
      this.#setStatus("closed");
    }
  }

  async #attempt() {
    const run = this.#run;
    this.#setStatus("connecting");
    if (this.#options.statusUrl) {
      const result = await this.#requestStatus();
      if (run !== this.#run) {
        return;
      }
      if (result.invalid) {
        this.#finish("error", { error: result.invalid });
        return;
      }
      if (result.ended) {
        this.#endFromStatus(result.ended);
        return;
      }
    }
    this.#connect(run);
  }

  // Returns { ended: body } for a stream that ended, { invalid: message } for
  // a rejected id, and {} when the stream should be opened.
  async #requestStatus() {
    this.#abort = new AbortController();
    const timer = setTimeout(() => this.#abort?.abort(), this.#options.statusTimeoutMs);
    try {
      const response = await fetch(this.#options.statusUrl, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        credentials: this.#options.withCredentials ? "include" : "same-origin",
        signal: this.#abort.signal,
      });
      if (response.status === 400) {
        const body = await response.json().catch(() => ({}));
        return { invalid: body.error || "invalid stream id: the status request got 400" };
      }
      if (!response.ok) {
        return {};
      }
      const body = await response.json();
      if (body && body.state && body.state !== "active" && body.terminal) {
        return { ended: body };
      }
      return {};
    } catch {
      // No usable response (server down, time-out, not JSON): the stream request decides.
      return {};
    } finally {
      clearTimeout(timer);
      this.#abort = null;
    }
  }

  #endFromStatus(body) {
    const { event, id, data, truncated } = body.terminal;
    const run = this.#run;
    if (id) {
      this.#lastEventId = String(id);
    }
    this.dispatchEvent(
      new MessageEvent(event || "message", { data: data ?? "", lastEventId: this.#lastEventId }),
    );
    if (run !== this.#run) {
      return;
    }
    const status = body.state === "completed" ? "completed" : "failed";
    this.#finish(status, { replayed: true, truncated: Boolean(truncated) });
  }

  #connect(run) {
    let url = this.#url;
    if (this.#lastEventId) {
      const parsed = new URL(url, globalThis.location?.href);
      parsed.searchParams.set("last_event_id", this.#lastEventId);
      url = parsed.href;
    }
    // NOTE: a connection that stays open but goes silent (a network partition
    // without a TCP reset) is not detected: EventSource hides the heartbeat
    // comments, so the client waits for the browser to report an error.
    const source = new EventSource(url, { withCredentials: this.#options.withCredentials });
    this.#source = source;

    source.onopen = () => {
      if (this.#source === source && run === this.#run) {
        this.#setStatus("streaming");
      }
    };
    source.onerror = () => {
      if (this.#source === source && run === this.#run) {
        this.#stop();
        this.#retry("the connection failed or was refused");
      }
    };
    const types = new Set([...this.#options.events, "completed", "failed", "gap"]);
    for (const type of types) {
      source.addEventListener(type, (event) => this.#onEvent(source, run, event));
    }
  }

  #onEvent(source, run, event) {
    if (this.#source !== source || run !== this.#run) {
      return;
    }
    this.#attempts = 0;
    if (this.#status !== "streaming") {
      this.#setStatus("streaming");
    }
    // EventSource keeps the last id across events without an id line. A new
    // EventSource starts with none, so an event without an id before the
    // first id (such as a gap event) must not erase the resume point.
    if (event.lastEventId) {
      this.#lastEventId = event.lastEventId;
    }
    this.dispatchEvent(
      new MessageEvent(event.type, {
        data: event.data,
        lastEventId: event.lastEventId,
        origin: event.origin,
      }),
    );
    if (run !== this.#run) {
      return;
    }
    const outcome = this.#options.terminal(event.type, event.data);
    if (outcome === "completed" || outcome === "failed") {
      this.#finish(outcome);
    }
  }

  #retry(reason) {
    this.#attempts += 1;
    const { maxRetries, initialDelayMs, maxDelayMs } = this.#options;
    if (this.#attempts > maxRetries) {
      this.#finish("error", {
        error: `gave up after ${maxRetries} reconnection attempts: ${reason}`,
      });
      return;
    }
    const delayMs = backoffDelay(this.#attempts, initialDelayMs, maxDelayMs);
    this.#setStatus("connecting");
    this.dispatchEvent(
      new CustomEvent("reconnect", {
        detail: { attempt: this.#attempts, delayMs, lastEventId: this.#lastEventId, reason },
      }),
    );
    const run = this.#run;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (run === this.#run) {
        this.#attempt();
      }
    }, delayMs);
  }

  #finish(status, detail = {}) {
    this.#run += 1;
    this.#stop();
    this.#setStatus(status, detail);
  }

  #stop() {
    if (this.#source) {
      this.#source.close();
      this.#source = null;
    }
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    this.#abort?.abort();
  }

  #setStatus(status, detail = {}) {
    const previous = this.#status;
    if (previous === status) {
      return;
    }
    this.#status = status;
    this.dispatchEvent(new CustomEvent("statuschange", { detail: { ...detail, status, previous } }));
  }
}
