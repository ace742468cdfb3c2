import { type Command, InvalidArgumentError } from "commander";
import { type ConnectionOptions, parseHeader, readClientTls } from "../auth/client-channel.js";
import { readTokenFile } from "../auth/token-file.js";

/** What the connection options of a command line give. */
export interface ConnectionFlags {
  tokenFile?: string;
  header: [string, string][];
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

/** --token-file, --header and --tls-*, shared by every command that talks to a farm. */
export function withConnectionOptions(command: Command, what = "a client"): Command {
  return command
    .option("--token-file <file>", `file holding the token sent as ${what} (authorization: Bearer …)`)
    .option(
      "--header <name=value>",
      "a header sent with every call, e.g. x-berth-registry-credentials=REGISTRY=USER:PASSWORD (repeatable)",
      (value: string, previous: [string, string][]) => {
        try {
          return [...previous, parseHeader(value)];
        } catch (err) {
          throw new InvalidArgumentError((err as Error).message);
        }
      },
      [] as [string, string][],
    )
    .option(
      "--tls-ca <file>",
      "PEM roots to verify the farm's certificate (implies TLS; grpcs:// addresses use TLS too)",
    )
    .option("--tls-cert <file>", "PEM client certificate, for farms that require one (mTLS)")
    .option("--tls-key <file>", "PEM key of --tls-cert");
}

export async function connectionFrom(address: string, flags: ConnectionFlags): Promise<ConnectionOptions> {
  return {
    address,
    token: flags.tokenFile === undefined ? undefined : await readTokenFile(flags.tokenFile),
    headers: flags.header,
    tls: readClientTls({ ca: flags.tlsCa, cert: flags.tlsCert, key: flags.tlsKey }),
  };
}
