# simple-app, the demo app: one static binary in an empty image. Built by compose/build.sh.
FROM scratch
COPY .build/simple-app /simple-app
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/simple-app"]
