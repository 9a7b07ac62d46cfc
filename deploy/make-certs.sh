#!/bin/sh
# Creates a cluster CA and issues certificates for schedulers and node
# agents, for the mutual TLS between them (DESIGN.md section 8).
#
#   deploy/make-certs.sh DIR [scheduler NAME...] [agent NAME...]
#   deploy/make-certs.sh /tmp/pki scheduler s1 s2 s3 agent n1 n2
#
# Writes DIR/ca.pem and DIR/ca.key (created once, reused after), and for
# each NAME DIR/NAME.pem and DIR/NAME.key. Keys are ECDSA P-256 and mode
# 0600. Each certificate has CN=NAME and OU=scheduler or OU=agent: the
# agent's RPC port accepts only OU=scheduler certificates and the agent's
# session accepts only a scheduler as its server, so an agent certificate
# cannot drive another agent. SANs cover localhost and 127.0.0.1 plus any
# extra ones in PADDOCK_CERT_SANS ("DNS:host.example,IP:10.0.0.5").
# Certificates are valid PADDOCK_CERT_DAYS days (default 825).
set -eu

usage() {
    echo "usage: $0 DIR [scheduler NAME...] [agent NAME...]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
DIR=$1
shift
DAYS=${PADDOCK_CERT_DAYS:-825}
command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 1; }

mkdir -p "$DIR"
chmod 0700 "$DIR"
umask 077

if [ ! -f "$DIR/ca.pem" ] || [ ! -f "$DIR/ca.key" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$DIR/ca.key"
    openssl req -new -x509 -key "$DIR/ca.key" -sha256 -days "$DAYS" \
        -subj "/O=paddock/CN=paddock cluster CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$DIR/ca.pem" 2>/dev/null
    chmod 0644 "$DIR/ca.pem"
fi

issue() {
    role=$1 name=$2
    case $name in
        ''|*[!a-z0-9-]*|-*) echo "$0: bad name \"$name\" (use [a-z0-9-])" >&2
                             exit 2 ;;
    esac
    sans="DNS:localhost,IP:127.0.0.1,DNS:$name"
    [ -n "${PADDOCK_CERT_SANS:-}" ] && sans="$sans,$PADDOCK_CERT_SANS"
    ext=$(mktemp "$DIR/.ext.XXXXXX")
    cat >"$ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
EXT
    openssl ecparam -name prime256v1 -genkey -noout -out "$DIR/$name.key"
    openssl req -new -key "$DIR/$name.key" \
        -subj "/O=paddock/OU=$role/CN=$name" -out "$DIR/$name.csr"
    openssl x509 -req -in "$DIR/$name.csr" -CA "$DIR/ca.pem" \
        -CAkey "$DIR/ca.key" -CAcreateserial -sha256 -days "$DAYS" \
        -extfile "$ext" -out "$DIR/$name.pem" 2>/dev/null
    rm -f "$DIR/$name.csr" "$ext"
    chmod 0644 "$DIR/$name.pem"
    echo "$DIR/$name.pem ($role)"
}

role=
for arg in "$@"; do
    case $arg in
        scheduler|agent) role=$arg ;;
        *) [ -n "$role" ] || usage
           issue "$role" "$arg" ;;
    esac
done
