import { Code, invalidArgument, StatusError } from "../status/status.js";
import { parseSri, type SriChecksum } from "./sri.js";

/** A qualifier as the wire has it. */
export interface Qualifier {
  readonly name: string;
  readonly value: string;
}

/** The standard and Bazel qualifier names Berth understands when it fetches from origin. */
export const CHECKSUM_SRI = "checksum.sri";
export const CANONICAL_ID = "bazel.canonical_id";
/** Bazel 4 to 6: JSON {uri: {header: value}} of credentials from .netrc or a credential helper. */
export const AUTH_HEADERS = "bazel.auth_headers";
/** Bazel 7 on: one header for every URI. */
const HTTP_HEADER = "http_header:";
/** Bazel 7 on: one header for uris[index] (`http_header_url:INDEX:NAME`). */
const HTTP_HEADER_URL = "http_header_url:";

/** Understood for a fetch from origin: they name the content (or are checked against it). */
const CONTENT_QUALIFIERS = new Set([CHECKSUM_SRI, CANONICAL_ID]);

/** A request's qualifiers, sorted into what Berth does with each. */
export interface ReadQualifiers {
  /** checksum.sri's checksums (one must match), when given. */
  readonly checksums: readonly SriChecksum[] | undefined;
  /**
   * What the content is remembered under, besides the URI: every qualifier
   * but request headers, sorted by name. Headers are how to reach the
   * content, not what it is, and hold credentials, which are never stored.
   */
  readonly key: readonly Qualifier[];
  /** Whether request headers (credentials, usually) were given. */
  readonly hasHeaders: boolean;
  /** Names of qualifiers a fetch from origin cannot honour (an association pushed with them can still be answered). */
  readonly unsupported: readonly string[];
  /** Headers to send to uris[index]'s origin. */
  headersFor(index: number): Readonly<Record<string, string>>;
}

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/** Headers a client may not set: they describe the connection or the message, which are Berth's. */
const RESERVED_HEADERS = new Set([
  "host",
  "connection",
  "content-length",
  "transfer-encoding",
  "te",
  "trailer",
  "upgrade",
  "keep-alive",
  "proxy-authorization",
  "proxy-connection",
]);

/**
 * Reads the qualifiers of a request naming `uris`. Names must be unique (as
 * the protocol says); a malformed value of a qualifier Berth understands is
 * INVALID_ARGUMENT naming it. Header values are never put in a message.
 */
export function readQualifiers(qualifiers: readonly Qualifier[], uris: readonly string[]): ReadQualifiers {
  const seen = new Set<string>();
  const key: Qualifier[] = [];
  const unsupported: string[] = [];
  const common: Record<string, string> = {};
  const perUri = new Map<number, Record<string, string>>();
  let checksums: SriChecksum[] | undefined;
  let hasHeaders = false;
  qualifiers.forEach((q, i) => {
    const field = `qualifiers[${i}]`;
    if (q.name === "") throw invalidArgument(`${field}.name`, "is empty");
    if (seen.has(q.name))
      throw invalidArgument(`${field}.name`, `"${clip(q.name)}" is given twice; names must be unique`);
    seen.add(q.name);
    if (q.name === AUTH_HEADERS) {
      hasHeaders = true;
      for (const [uri, headers] of Object.entries(parseAuthHeaders(q.value, `${field}.value`))) {
        uris.forEach((u, index) => {
          if (u === uri) perUri.set(index, { ...perUri.get(index), ...headers });
        });
      }
      return;
    }
    if (q.name.startsWith(HTTP_HEADER_URL)) {
      hasHeaders = true;
      const match = /^([0-9]{1,9}):(.+)$/.exec(q.name.slice(HTTP_HEADER_URL.length));
      if (!match) throw invalidArgument(`${field}.name`, `"${clip(q.name)}" is not ${HTTP_HEADER_URL}INDEX:HEADER`);
      const header = checkHeader(match[2] as string, q.value, field);
      const index = Number(match[1]);
      perUri.set(index, { ...perUri.get(index), [header]: q.value });
      return;
    }
    if (q.name.startsWith(HTTP_HEADER)) {
      hasHeaders = true;
      common[checkHeader(q.name.slice(HTTP_HEADER.length), q.value, field)] = q.value;
      return;
    }
    if (q.name === CHECKSUM_SRI) checksums = parseSri(q.value, `${field}.value`);
    if (!CONTENT_QUALIFIERS.has(q.name)) unsupported.push(q.name);
    key.push({ name: q.name, value: q.value });
  });
  key.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return {
    checksums,
    key,
    hasHeaders,
    unsupported,
    headersFor: (index) => ({ ...common, ...perUri.get(index) }),
  };
}

/** INVALID_ARGUMENT with one BadRequest violation per qualifier, as the protocol asks: `"{name}" not supported`. */
export function unsupportedQualifiers(names: readonly string[]): StatusError {
  const listed = names.map((n) => `"${clip(n)}"`).join(", ");
  return new StatusError(
    Code.INVALID_ARGUMENT,
    `qualifiers ${listed} not supported for fetching from origin (this farm checks ${[...CONTENT_QUALIFIERS].join(", ")} ` +
      `and sends ${AUTH_HEADERS}, ${HTTP_HEADER}* and ${HTTP_HEADER_URL}* as request headers); ` +
      "content pushed with exactly these qualifiers would be answered",
    {
      fieldViolations: names.map((name) => ({
        field: "qualifiers.name",
        description: `"${clip(name)}" not supported`,
      })),
    },
  );
}

function parseAuthHeaders(value: string, field: string): Record<string, Record<string, string>> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch {
    throw invalidArgument(field, `${AUTH_HEADERS} is not JSON of the form {"URI": {"HEADER": "VALUE"}}`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw invalidArgument(field, `${AUTH_HEADERS} is not a JSON object of the form {"URI": {"HEADER": "VALUE"}}`);
  }
  const out: Record<string, Record<string, string>> = {};
  for (const [uri, headers] of Object.entries(parsed)) {
    if (typeof headers !== "object" || headers === null || Array.isArray(headers)) {
      throw invalidArgument(field, `${AUTH_HEADERS}: the entry of a URI is not an object of headers`);
    }
    const checked: Record<string, string> = {};
    for (const [name, v] of Object.entries(headers)) {
      if (typeof v !== "string")
        throw invalidArgument(field, `${AUTH_HEADERS}: header "${clip(name)}" is not a string`);
      checked[checkHeader(name, v, field)] = v;
    }
    out[uri] = checked;
  }
  return out;
}

/** The header's name in lowercase; refuses a malformed or reserved one, or a value that would split the request. */
function checkHeader(name: string, value: string, field: string): string {
  if (!HEADER_NAME.test(name)) throw invalidArgument(field, `"${clip(name)}" is not an HTTP header name`);
  const lower = name.toLowerCase();
  if (RESERVED_HEADERS.has(lower)) throw invalidArgument(field, `the header "${name}" may not be set by a client`);
  if (/[\r\n\0]/.test(value)) throw invalidArgument(field, `the value of header "${name}" holds a line break or NUL`);
  return lower;
}

function clip(text: string): string {
  return text.length > 100 ? `${text.slice(0, 100)}…` : text;
}
