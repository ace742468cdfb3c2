/**
 * Permission bits an image's file or directory may keep on the host: no
 * set-user-ID or set-group-ID bit (a setuid-root binary in a layer would
 * make any local user who reaches it root) and no write permission for the
 * group or others (the owner and group come from the image, so they may
 * name host users; a 0777 directory would let them plant files that later
 * actions see). The sticky bit stays: it only narrows who may delete.
 * Owner bits stay as the image has them: the owner is root or an image user,
 * and actions reach the copy through a read-only overlay lower layer.
 */
export function hostMode(mode: number): number {
  return mode & HOST_MODE_MASK;
}

/** rwx for the owner, r-x for group and others, and the sticky bit. */
export const HOST_MODE_MASK = 0o1755;
