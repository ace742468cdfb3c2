import { readFileSync } from "node:fs";
import {
  type ChannelCredentials,
  type ChannelOptions,
  type ClientOptions,
  credentials,
  InterceptingCall,
  type Interceptor,
  Metadata,
} from "@grpc/grpc-js";
import { AUTHORIZATION } from "./bearer.js";
import { readPrivateFileSync } from "./private-file.js";

/** PEM material for a TLS connection to a farm. */
export interface ClientTls {
  /** Roots to verify the farm's certificate with (default: the system's). */
  ca?: Buffer;
  /** A client certificate and its key, for farms that ask for one (mTLS). */
  cert?: Buffer;
  key?: Buffer;
}

/** How to reach a farm: its address, and what to present. */
export interface ConnectionOptions {
  /** HOST:PORT or grpc://HOST:PORT (plain), grpcs://HOST:PORT (TLS), or unix:PATH. */
  address: string;
  /** Sent as `authorization: Bearer TOKEN` on every call. */
  token?: string;
  /** More headers sent on every call (e.g. x-berth-registry-credentials). */
  headers?: readonly (readonly [string, string])[];
  /** TLS settings; TLS is also used, with the system's roots, for grpcs:// addresses. */
  tls?: ClientTls;
}

/** What a generated client's constructor takes. */
export interface ClientChannel {
  readonly target: string;
  readonly credentials: ChannelCredentials;
  readonly options: ClientOptions;
}

/**
 * Channel arguments for a connection to a farm. Headers are added by an
 * interceptor rather than call credentials, which grpc-js refuses on plain
 * connections (loopback farms run without TLS).
 */
export function clientChannel(connection: ConnectionOptions, channelOptions: ChannelOptions = {}): ClientChannel {
  const { target, secure } = parseAddress(connection.address);
  const tls = connection.tls;
  const useTls = secure || (tls !== undefined && (tls.ca ?? tls.cert ?? tls.key) !== undefined);
  const creds = useTls
    ? credentials.createSsl(tls?.ca ?? null, tls?.key ?? null, tls?.cert ?? null)
    : credentials.createInsecure();
  const headers: [string, string][] = [
    ...(connection.token === undefined ? [] : [[AUTHORIZATION, `Bearer ${connection.token}`] as [string, string]]),
    ...(connection.headers ?? []).map(([name, value]) => [name, value] as [string, string]),
  ];
  const interceptors = headers.length > 0 ? [headerInterceptor(headers)] : [];
  return { target, credentials: creds, options: { ...channelOptions, interceptors } };
}

function parseAddress(address: string): { target: string; secure: boolean } {
  if (address.startsWith("grpcs://")) return { target: address.slice("grpcs://".length), secure: true };
  if (address.startsWith("grpc://")) return { target: address.slice("grpc://".length), secure: false };
  return { target: address, secure: false };
}

function headerInterceptor(headers: readonly (readonly [string, string])[]): Interceptor {
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start: (metadata: Metadata, listener, next) => {
        for (const [name, value] of headers) metadata.add(name, value);
        next(metadata, listener);
      },
    });
}

/** Reads the PEM files named on a command line (--tls-ca, --tls-cert, --tls-key). */
export function readClientTls(files: { ca?: string; cert?: string; key?: string }): ClientTls | undefined {
  if (files.ca === undefined && files.cert === undefined && files.key === undefined) return undefined;
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new Error("--tls-cert and --tls-key go together");
  }
  const read = (path: string | undefined) => (path === undefined ? undefined : readFileSync(path));
  return {
    ca: read(files.ca),
    cert: read(files.cert),
    key: files.key === undefined ? undefined : readPrivateFileSync(files.key, "the --tls-key file"),
  };
}

/** `NAME=VALUE` of a --header option. */
export function parseHeader(text: string): [string, string] {
  const at = text.indexOf("=");
  if (at <= 0) throw new Error(`"${text}" is not NAME=VALUE`);
  return [text.slice(0, at).toLowerCase(), text.slice(at + 1)];
}

export { Metadata };
