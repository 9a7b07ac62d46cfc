/*
 * The QEMU command line of one sandbox, and the accelerator choice.
 *
 * TODO: switch to the guest engineer's node-agent/qemu.h (QEMU argv
 * builder and KVM probe) once it lands; this file is the stand-in with
 * the same job so the agent can run meanwhile.
 */
#ifndef AGENT_VMARGV_H
#define AGENT_VMARGV_H

#include <stddef.h>

struct sandbox;

/* The slirp netdev's id, for hostfwd_add over QMP. */
#define VM_NETDEV_ID "net0"
/* The virtio-serial port the guest agent opens. */
#define VM_GUEST_PORT "org.paddock.guest"

/* Builds a NULL-terminated malloc'd argv for the sandbox's QEMU. */
int vm_argv(const struct sandbox *sb, char ***out, char *err, size_t errlen);
void vm_argv_free(char **argv);

#endif
