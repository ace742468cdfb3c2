import { execFile } from "node:child_process";
import { chmod, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

/**
 * With openssl, in `dir` (made if absent), each as NAME.pem with its key NAME.key (0600, as Berth asks of
 * keys): a CA `ca`; from it a server certificate `server` for 127.0.0.1 and localhost, client certificates
 * `client` and `worker-1`; and `rogue-client` from a CA `rogue-ca` nobody trusts.
 */
export async function makeCertificates(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  const openssl = (...args: string[]) => run("openssl", args, { cwd: dir });
  const newKey = async (name: string) => {
    await openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", `${name}.key`);
    await chmod(join(dir, `${name}.key`), 0o600);
  };
  const authority = async (name: string) => {
    await newKey(name);
    await openssl(
      "req",
      "-x509",
      "-new",
      "-key",
      `${name}.key`,
      "-out",
      `${name}.pem`,
      "-days",
      "2",
      "-subj",
      `/CN=${name}`,
    );
  };
  const leaf = async (name: string, issuer: string, extensions: string) => {
    await newKey(name);
    await openssl("req", "-new", "-key", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    await writeFile(join(dir, `${name}.ext`), extensions);
    const ca = ["-CA", `${issuer}.pem`, "-CAkey", `${issuer}.key`, "-CAcreateserial"];
    await openssl(
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      ...ca,
      "-out",
      `${name}.pem`,
      "-days",
      "2",
      "-extfile",
      `${name}.ext`,
    );
  };
  await authority("ca");
  await authority("rogue-ca");
  await leaf("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  await leaf("client", "ca", "extendedKeyUsage=clientAuth\n");
  await leaf("rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n");
  await leaf("worker-1", "ca", "extendedKeyUsage=clientAuth\n");
}
