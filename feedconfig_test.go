package ssefeed

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

func TestDefaultName(t *testing.T) {
	for _, tc := range []struct {
		name, url, want string
	}{
		{"host and path", "http://api.example/v1/items", "api.example/v1/items"},
		{"port kept", "http://127.0.0.1:9/s", "127.0.0.1:9/s"},
		{"path not UTF-8 stays escaped", "http://host/caf%E9/feed", "host/caf%E9/feed"},
		{"no host", "not-a-url", "sse_feed"},
		{"does not parse", "http://host/%zz?token=s3cret", "sse_feed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, defaultName(tc.url))
		})
	}
}

func TestDefaultNameHidesTheQuery(t *testing.T) {
	one, other := defaultName("http://h/items?token=s3cret"), defaultName("http://h/items?token=other")
	require.NotEqual(t, one, other, "feeds that differ only in their query share a name")
	for _, name := range []string{one, other} {
		require.True(t, strings.HasPrefix(name, "h/items?"), name)
		require.NotContains(t, name, "s3cret")
		require.NotContains(t, name, "token")
		require.True(t, utf8.ValidString(name))
	}
}

func TestProvisionRefusesANameThatIsNoLabel(t *testing.T) {
	h := &Handler{FeedConfig: FeedConfig{Tail: "http://127.0.0.1:9/s", Name: "caf\xe9"}}
	_, err := provisionErr(t, h)
	require.ErrorContains(t, err, "name must be valid UTF-8")
}

func TestProvisionNamesAFeedWhosePathIsNotUTF8(t *testing.T) {
	h := &Handler{FeedConfig: FeedConfig{Poll: "http://127.0.0.1:9/caf%E9/feed"}}
	_, err := provisionErr(t, h)
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:9/caf%E9/feed", h.Name)
}
