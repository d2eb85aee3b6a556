#!/bin/sh
# Write k8s/secrets/*.env with random credentials, from the *.example.env templates.
# Existing .env files are kept (delete one to regenerate it). Nothing is printed.
set -eu
cd "$(dirname "$0")"
umask 077

rand() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

for example in *.example.env; do
    target="${example%.example.env}.env"
    [ -e "$target" ] && { echo "kept      $target"; continue; }
    case "$target" in
        ray-storage.env)
            # Same keys as the MinIO root user (mlflow-s3.env), generated first if needed.
            [ -e mlflow-s3.env ] || { echo "generate mlflow-s3.env first" >&2; exit 1; }
            grep -E '^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)=' mlflow-s3.env > "$target" ;;
        *)
            while IFS= read -r line; do
                case "$line" in
                    AWS_ACCESS_KEY_ID=) echo "AWS_ACCESS_KEY_ID=protscale$(rand 6)" ;;
                    *=) echo "${line}$(rand 24)" ;;
                    *) echo "$line" ;;
                esac
            done < "$example" > "$target" ;;
    esac
    echo "generated $target"
done
